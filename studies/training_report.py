"""Training reports: raw GPU device outputs -> tables, verdicts and plots in studies/results/training/.

    python studies/training_report.py

Campaign 3 (issue 16, raw/campaign3) -> README.md, the main report; campaign 2 (issue 4, raw/call5-8,
ddp, balance) -> README-campaign2.md with its json and plots; campaign 1 (raw/call1-4) is kept as
written, README-campaign1.md. Both generators also feed summary.json (one record per run, with
its campaign) and test_ppl.json's "campaign3" entry (the test loss of each campaign-3 run's kept
weights); its "landed" entry is the CPU `perseus eval` of those weights once committed, the other
entries are the models committed before campaign 3.
"""

from __future__ import annotations

import json

import training_campaign2
import training_campaign3

RESULTS = training_campaign2.RESULTS


def main() -> None:
    c2 = training_campaign2.report()
    test_ppl = json.loads((RESULTS / "test_ppl.json").read_text())
    before = {k: v for k, v in test_ppl.items() if k not in ("campaign3", "landed")}
    c3 = training_campaign3.report(before, json.loads((RESULTS / "arch_54m.json").read_text()),
                                   json.loads((RESULTS / "muon_vs_adamw.json").read_text()), test_ppl.get("landed", {}))
    records = [{"campaign": 2, **r} for r in c2] + c3
    (RESULTS / "summary.json").write_text(
        json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in records], indent=1) + "\n")
    test_ppl["campaign3"] = {r["name"]: {"split": "test", "seq_len": r["test_seq_len"], "tokens": r["test_tokens"],
                                         "loss": r["test_loss"], "ppl": r["test_ppl"], "step": r["test_step"],
                                         "weights": "OUT/best, fp32 on the GPU", "command": "train_suite.py score"}
                             for r in c3}
    (RESULTS / "test_ppl.json").write_text(json.dumps(test_ppl, indent=1) + "\n")
    print(f"wrote {RESULTS}/README.md (campaign 3, {len(c3)} runs) and README-campaign2.md ({len(c2)} runs)")


if __name__ == "__main__":
    main()
