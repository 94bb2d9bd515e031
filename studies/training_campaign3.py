"""Training report of campaign 3 (issue 16): the whole train split, 105M tokens per run, one H200.

Reads `studies/results/training/raw/campaign3/`: per run log.jsonl, train_config.json, stdout.txt;
runs.jsonl (every `perseus train` command started, in order), test_ppl.jsonl (`train_suite.py
score` after the last run), test_ppl-call3.jsonl (the same, one call earlier: it scored the 202m
run that died), timeline.jsonl (start and end of each run: file times in the tarballs the device
calls returned) and device.json (the device calls and time used, as the device tool reported
them). Writes README.md, campaign3.json and valid_loss_vs_tokens_campaign3.png next to raw/;
`report()` returns one record per run for summary.json. Every number in README.md is computed
here from those files. Run through `python studies/training_report.py` (all campaigns).
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from perseus_edge.model.config import preset  # noqa: E402
from perseus_edge.train import H100_BF16_PEAK  # noqa: E402
from training_campaign2 import SEED_MOE_GAIN, SEED_MUON_RATIO, crossing, read_jsonl, steady_median  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "training"
RAW = RESULTS / "raw" / "campaign3"
PLOT = "valid_loss_vs_tokens_campaign3.png"
GOALS = {"17m": 55.0, "54m": 40.0}  # issue 16: test perplexity goals
BEFORE = {"17m": "perseus_edge/assets/default", "54m": "models/perseus-54m-moe-mla-rope"}  # test_ppl.json keys
MLA_TOLERANCE = 1.0  # % (seed claim: MLA r=d/2 within 1% of MHA)
MUON_TOLERANCE = 0.05  # the tolerance campaign 2 used around the claimed ratio
ARCH_RUNS = ("54m-mha-muon-lr0.003", "54m-mla-dense-muon-lr0.003", "54m-moe-mla-rope-muon-lr0.003")
ADAMW, MUON, MUON_HIGH = "54m-moe-mla-rope-adamw-lr0.001", "54m-moe-mla-rope-muon-lr0.003", "54m-moe-mla-rope-muon-lr0.01"
R17, R54, R202, R202_B64 = ("17m-moe-mla-rope-muon-lr0.01", "54m-moe-mla-rope-muon-lr0.003",
                            "202m-moe-mla-rope-muon-lr0.003", "202m-b64-stopped")


# ----------------------------------------------------------------------------- loading
def utc(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")


def matching_command(rows: list[dict], cfg: dict) -> dict:
    """The runs.jsonl row that started this folder's run: same output folder, batch, --force, --tokenizer."""
    out = Path(cfg["out"]).name
    hits = [r for r in rows if r["command"].endswith(f"/{out}") and f"--batch-size {cfg['batch_size']} " in r["command"]
            and ("--force" in r["command"]) == cfg["force"] and ("--tokenizer" in r["command"]) == bool(cfg["tokenizer"])]
    assert len(hits) == 1, (out, hits)
    return hits[0]


def most_at_once(span: tuple, spans: list[tuple]) -> int:
    """The most runs (this one included) training at one moment of `span`."""
    s, e = span
    moments = [s] + [t for t, _ in spans if s <= t <= e]
    return max(sum(a <= t <= b for a, b in spans) for t in moments)


def load(device: dict) -> tuple[list[dict], list[dict]]:
    """Run records (one per raw folder) and the attempts that died at their first step."""
    commands = read_jsonl(RAW / "runs.jsonl")
    final = {r["run"]: r for r in read_jsonl(RAW / "test_ppl.jsonl")}
    call3 = {r["run"]: r for r in read_jsonl(RAW / "test_ppl-call3.jsonl")}
    timeline = read_jsonl(RAW / "timeline.jsonl")
    kept = {r["run"]: (utc(r["start_utc"]), utc(r["end_utc"])) for r in timeline if r["attempt"] == "kept"}
    spans = list(kept.values())
    train_tokens = device["prepare"]["train_tokens"]
    runs = []
    for folder in sorted(p.parent for p in RAW.glob("*/log.jsonl")):
        cfg = json.loads((folder / "train_config.json").read_text())
        log = read_jsonl(folder / "log.jsonl")
        vals = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
        best_step, best_val = min(vals, key=lambda v: v[1])
        test = final.get(folder.name)
        if test is None:  # the 202m that died: scored one call earlier, under its output folder's name
            test = call3[Path(cfg["out"]).name]
            assert test["step"] == best_step, (folder.name, test["step"], best_step)
        cmd = matching_command(commands, cfg)
        tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
        start, end = kept[folder.name]
        stdout = (folder / "stdout.txt").read_text()
        error = next((line for line in stdout.splitlines() if line.startswith("error:")), None)
        runs.append({
            "campaign": 3, "call": "campaign3", "name": folder.name, "preset": cfg["preset"], "arch": cfg["arch"],
            "optimizer": cfg["optimizer"], "lr": cfg["lr"], "adam_lr": cfg["adam_lr"],
            "router_bias_rate": cfg["router_bias_rate"], "gpus": 1, "batch_size": cfg["batch_size"],
            "seq_len": cfg["seq_len"], "planned_steps": cfg["steps"], "steps": log[-1]["step"], "tokens": log[-1]["tokens"],
            "epochs": round(log[-1]["tokens"] / train_tokens, 3), "flops": log[-1]["flops"],
            "best_val_loss": best_val, "best_step": best_step, "best_tokens": best_step * tokens_per_step,
            "best_epochs": round(best_step * tokens_per_step / train_tokens, 3),
            "final_val_loss": vals[-1][1], "final_train_loss": log[-1]["loss"],
            "test_loss": test["loss"], "test_ppl": test["ppl"], "test_step": test["step"], "test_tokens": test["tokens"],
            "test_seq_len": test["seq_len"],
            "tokens_per_s": steady_median(log, "tokens_per_s"), "mfu": steady_median(log, "mfu"),
            "max_mem_gib": max(r["max_mem_gib"] for r in log), "concurrent": most_at_once((start, end), spans),
            "started_together": cmd["concurrent"], "wall_s": (end - start).total_seconds(),
            "start_utc": start.strftime("%H:%M:%S"), "end_utc": end.strftime("%H:%M:%S"),
            "expert_load_final": log[-1].get("expert_load_max_over_mean") or None,
            "early_stop": log[-1].get("early_stop"), "command": cmd["command"],
            "status": f"died at step {log[-1]['step']} (below)" if error else
                      ("finished" if log[-1]["step"] == cfg["steps"] else f"early stop at {log[-1]['step']}"), "error": error,
            "_vals": vals,
        })
    attempts = []
    for r in timeline:
        if r["attempt"] != "kept":
            text = (RAW / r["run"] / "stdout-first-attempt-oom.txt").read_text()
            error = next(line for line in text.splitlines() if re.match(r"(torch\.OutOfMemoryError|RuntimeError): ", line))
            error = error.split(". ")[0].replace("`", "")  # the first sentence, as plain text
            attempts.append({"run": r["run"], "start_utc": r["start_utc"][11:19], "end_utc": r["end_utc"][11:19],
                             "error": error, "command": next(c["command"] for c in commands if c["command"].endswith(
                                 f"/{r['run']}") and "--force" not in c["command"])})
    runs.sort(key=lambda r: (int(r["preset"][:-1]), r["name"] == R202_B64, r["name"]))
    return runs, attempts


def oom_memory(attempts: list[dict]) -> dict:
    """GPU memory per process as CUDA reported it in the OOM message (PyTorch and non-PyTorch memory)."""
    oom = next(a["run"] for a in attempts if a["error"].startswith("torch.OutOfMemoryError"))
    msg = next(line for line in (RAW / oom / "stdout-first-attempt-oom.txt").read_text().splitlines()
               if line.startswith("torch.OutOfMemoryError"))
    others = [float(x) for x in re.findall(r"Process \d+ has ([\d.]+) GiB", msg)]
    this = float(re.search(r"this process has ([\d.]+) GiB", msg).group(1))
    return {"capacity_gib": float(re.search(r"total capacity of ([\d.]+) GiB", msg).group(1)),
            "processes": len(others) + 1, "others_gib": others, "this_process_gib": this,
            "in_use_gib": round(sum(others) + this, 2)}


# ----------------------------------------------------------------------------- analysis
def pct(a: float, b: float) -> float:
    return round(100 * (a - b) / b, 2)


def claims(by: dict) -> dict:
    mha = by["54m-mha-muon-lr0.003"]
    arch = {}
    for name in ARCH_RUNS:
        r = by[name]
        counts = preset("54m", r["arch"]).param_counts()
        arch[r["arch"]] = {"run": name, "params_total": counts["total"], "params_active": counts["active"],
                           "tokens": r["tokens"], "final_val_loss": r["final_val_loss"], "test_loss": r["test_loss"],
                           "test_ppl": r["test_ppl"], "val_vs_mha_pct": pct(r["final_val_loss"], mha["final_val_loss"]),
                           "test_vs_mha_pct": pct(r["test_loss"], mha["test_loss"])}
    mla, moe = arch["mla-dense"], arch["moe-mla-rope"]
    mla_held = abs(mla["val_vs_mha_pct"]) < MLA_TOLERANCE and abs(mla["test_vs_mha_pct"]) < MLA_TOLERANCE
    moe_held = -moe["val_vs_mha_pct"] >= SEED_MOE_GAIN - 1 and -moe["test_vs_mha_pct"] >= SEED_MOE_GAIN - 1

    adamw, muon = by[ADAMW], by[MUON]
    target = adamw["final_val_loss"]
    at_eval, interp = crossing(muon["_vals"], target)
    ratio = round(interp / adamw["steps"], 3)
    lo, hi = SEED_MUON_RATIO
    verdict = ("held" if lo <= ratio <= hi else
               f"not held strictly, within campaign 2's {MUON_TOLERANCE} tolerance"
               if lo - MUON_TOLERANCE <= ratio <= hi + MUON_TOLERANCE else
               "not held: Muon saved more" if ratio < lo else "not held: Muon saved less")
    return {
        "budget_tokens": muon["tokens"], "seed_runs": 1,
        "architectures": arch,
        "mla_within_1pct": {"held": mla_held, "val_pct": mla["val_vs_mha_pct"], "test_pct": mla["test_vs_mha_pct"]},
        "moe_6.9pct_better": {"held": moe_held, "claim_pct": -SEED_MOE_GAIN, "val_pct": moe["val_vs_mha_pct"],
                              "test_pct": moe["test_vs_mha_pct"]},
        "muon_vs_adamw": {"adamw_run": ADAMW, "muon_run": MUON, "adamw_final_val_loss": target,
                          "adamw_steps": adamw["steps"], "muon_first_eval_below": at_eval,
                          "muon_steps_interpolated": round(interp, 1), "ratio": ratio, "claim": list(SEED_MUON_RATIO),
                          "verdict": verdict, "muon_final_val_vs_adamw_pct": pct(muon["final_val_loss"], target),
                          "muon_test_ppl": muon["test_ppl"], "adamw_test_ppl": adamw["test_ppl"]},
        "muon_lr_54m": {f"{by[n]['lr']:g}": {"final_val_loss": by[n]["final_val_loss"], "test_ppl": by[n]["test_ppl"]}
                        for n in (MUON, MUON_HIGH)},
    }


def models(by: dict, before: dict, landed: dict) -> dict:
    out = {}
    for p, run in (("17m", R17), ("54m", R54)):
        r = by[run]
        cpu = landed.get(BEFORE[p], {})
        out[p] = {"run": run, "test_loss": r["test_loss"], "test_ppl": r["test_ppl"], "goal_ppl": GOALS[p],
                  "landed_cpu_ppl": cpu.get("ppl") if cpu.get("run") == run else None,
                  "met": r["test_ppl"] <= GOALS[p], "before_ppl": before[BEFORE[p]]["ppl"], "before_key": BEFORE[p],
                  "same_windows": (before[BEFORE[p]]["seq_len"], before[BEFORE[p]]["tokens"]) == (r["test_seq_len"], r["test_tokens"])}
    big = by[R202]
    out["202m"] = {"run": R202, "test_loss": big["test_loss"], "test_ppl": big["test_ppl"], "best_step": big["best_step"],
                   "beats_54m": big["test_ppl"] < by[R54]["test_ppl"]}
    return out


def plateau(by: dict, device: dict) -> dict:
    big, mid, small = by[R202], by[R54], by[R17]
    tokens_per_step = big["batch_size"] * big["seq_len"]
    # the 202m's valid loss below the 54m's at the same step (same batch, same schedule): up to which eval?
    lower = [s for (s, v), (_, w) in zip(big["_vals"], mid["_vals"]) if v < w]
    b64 = by[R202_B64]
    same_tokens = [(s64, v64, s128, v128) for s64, v64 in b64["_vals"] for s128, v128 in big["_vals"]
                   if s64 * b64["batch_size"] == s128 * big["batch_size"]]
    train_tokens = device["prepare"]["train_tokens"]
    return {
        "train_tokens": train_tokens,
        "202m": {"best_step": big["best_step"], "best_epochs": big["best_epochs"], "best_val_loss": big["best_val_loss"],
                 "final_val_loss": big["final_val_loss"], "rise_after_best": round(big["final_val_loss"] - big["best_val_loss"], 4),
                 "final_train_loss": big["final_train_loss"], "params": preset("202m").param_counts()["total"],
                 "below_54m_until_step": max(lower) if lower else None,
                 "below_54m_until_epochs": round(max(lower) * tokens_per_step / train_tokens, 2) if lower else None},
        "54m": {"final_epochs": mid["epochs"], "last_eval_gain": round(mid["_vals"][-2][1] - mid["_vals"][-1][1], 4),
                "final_train_loss": mid["final_train_loss"], "final_val_loss": mid["final_val_loss"]},
        "17m": {"final_epochs": small["epochs"], "last_eval_gain": round(small["_vals"][-2][1] - small["_vals"][-1][1], 4)},
        "202m_batch64_vs_128_same_tokens": [{"tokens": s128 * tokens_per_step, "batch64": v64, "batch128": v128}
                                             for s64, v64, s128, v128 in same_tokens],
    }


# ----------------------------------------------------------------------------- plot
def plot(runs: list[dict], train_tokens: int) -> str:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in runs:
        per_step = r["batch_size"] * r["seq_len"] / 1e6
        steps, vals = zip(*r["_vals"])
        style = dict(ls="--" if r["name"] == R202_B64 else "-", marker=".")
        line, = ax.plot([s * per_step for s in steps], vals, label=f"{r['name']} (batch {r['batch_size']})", **style)
        ax.plot([r["best_step"] * per_step], [r["best_val_loss"]], marker="*", ms=11, color=line.get_color())
    ax.set_xlabel("training tokens seen (M)")
    ax.set_ylabel("validation loss (nats/token, whole valid split)")
    ax.set_ylim(3.5, 4.7)
    ax.grid(alpha=0.3)
    top = ax.secondary_xaxis("top", functions=(lambda m: m * 1e6 / train_tokens, lambda e: e * train_tokens / 1e6))
    top.set_xlabel(f"epochs of the train split ({train_tokens:,} tokens)")
    ax.legend(fontsize=8)
    ax.set_title("Campaign 3: valid loss vs tokens (star = best eval; dashed: died at step 790)", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / PLOT, dpi=110)
    plt.close(fig)
    return PLOT


# ----------------------------------------------------------------------------- README
def fm(x: float) -> str:
    return f"{x / 1e6:.1f}M"


def write_readme(runs, attempts, device, mod, cl, pl, mem, c2, c2_muon) -> str:
    by = {r["name"]: r for r in runs}
    first = by[R54]
    train_tokens = device["prepare"]["train_tokens"]
    cfg = json.loads((RAW / R54 / "train_config.json").read_text())
    relaunched = [r for r in runs if r["name"] in {x["run"] for x in attempts}]
    relaunch = min(datetime.datetime.strptime(r["start_utc"], "%H:%M:%S") for r in relaunched)
    still = [f"`{r['name']}`" for r in runs if r not in relaunched and datetime.datetime.strptime(r["start_utc"], "%H:%M:%S")
             < relaunch < datetime.datetime.strptime(r["end_utc"], "%H:%M:%S")]
    alone = ", ".join(f"`{r['name']}`" for r in runs if r["concurrent"] == 1)
    c2_batch = c2_muon["54m"]["tokens_per_step"] // cfg["seq_len"]  # campaign 2 ran seq 512 too
    L = ["<!-- generated by `python studies/training_report.py` from raw/campaign3/: do not edit by hand -->",
         "# Training results, campaign 3 (issue 16): the whole corpus, 105M tokens per run, one H200", "",
         f"Every run trained on the **whole train split** ({train_tokens:,} tokens; valid {device['prepare']['valid_tokens']:,}) "
         f"with batch {cfg['batch_size']} x {cfg['seq_len']} = {cfg['batch_size'] * cfg['seq_len']:,} tokens/step "
         f"(the first 202m try: batch {by[R202_B64]['batch_size']}), {cfg['steps']} steps = {fm(first['tokens'])} tokens = "
         f"{first['epochs']:.2f} epochs, warmup {cfg['warmup']}, cosine to {cfg['min_lr_ratio']:g} of the lr, bf16 autocast, "
         f"seed {cfg['seed']}, `--compile`, eval every {cfg['eval_every']} steps on the whole valid split, `--patience "
         f"{cfg['patience']}` (OUT/best keeps the weights of the best eval; a run stops after {cfg['patience']} evals without "
         f"a better one); MoE runs `--router-bias-rate {cfg['router_bias_rate']:g}` (campaign 2's balance study). "
         f"Test loss: `train_suite.py score`, each run's OUT/best in fp32 on the GPU, seq 256, "
         f"{first['test_tokens']:,} tokens = the windows `perseus eval --split test` scores. One {device['kind']} "
         "(the device calls are in [studies/gpu/README.md](../../gpu/README.md#campaign-3)); raw logs in "
         "[raw/campaign3/](raw/campaign3/). Earlier campaigns: [README-campaign2.md](README-campaign2.md) (H100, "
         "5-6M tokens per run, Muon vs AdamW sweeps, architectures, router balance, throughput, two GPUs) and "
         "[README-campaign1.md](README-campaign1.md).", "",
         "## Models", "",
         "| model | run | test loss | test ppl | before | goal | |", "|---|---|---|---|---|---|---|"]
    for p in ("17m", "54m"):
        m = mod[p]
        L.append(f"| {p} | `{m['run']}` | {m['test_loss']:.4f} | **{m['test_ppl']:.2f}** | {m['before_ppl']:.2f} | "
                 f"<= {m['goal_ppl']:g} | {'met' if m['met'] else 'not met'} |")
    big = mod["202m"]
    L.append(f"| 202m | `{big['run']}` (best: step {big['best_step']}) | {big['test_loss']:.4f} | {big['test_ppl']:.2f} | - | "
             f"commit only if it beats the 54m | {'beats' if big['beats_54m'] else 'does not beat'} the 54m |")
    L += ["", f"- 17m: test perplexity {mod['17m']['before_ppl']:.2f} -> **{mod['17m']['test_ppl']:.2f}**; these weights "
          "replace the embedded default (`perseus_edge/assets/default`).",
          f"- 54m: {mod['54m']['before_ppl']:.2f} -> **{mod['54m']['test_ppl']:.2f}**. " + (
              f"These weights replace `models/perseus-54m-moe-mla-rope`, in a submission of their own (one replacing "
              f"both models was over the submission's size limit); `perseus eval` of the committed folder on the CPU "
              f"gives {mod['54m']['landed_cpu_ppl']:.2f} (test_ppl.json, \"landed\")."
              if mod["54m"]["landed_cpu_ppl"] else
              "The new 54M weights are kept for a later commit of their own: one commit replacing both models is "
              "over the submission's size limit, so `models/perseus-54m-moe-mla-rope` is still campaign 2's model."),
          f"- 202m: best valid loss at step {big['best_step']} ({pl['202m']['best_epochs']:.2f} epochs), then it overfits "
          f"(next section); test perplexity {big['test_ppl']:.2f} of its best weights "
          f"{'beats' if big['beats_54m'] else 'does not beat'} the 54m's {mod['54m']['test_ppl']:.2f}, "
          f"so it is {'committed' if big['beats_54m'] else 'not committed'} (the issue's rule).",
          f"- \"before\": `test_ppl.json`'s `{mod['17m']['before_key']}` and `{mod['54m']['before_key']}`, the models "
          "committed before this campaign (`perseus eval --split test`, "
          + ("the same seq length and test tokens" if mod["17m"]["same_windows"] and mod["54m"]["same_windows"]
             else "**other windows** than campaign 3's score") + ").", "",
          "## Runs", "",
          "| run | preset | arch | optimizer | lr | batch x seq | steps | tokens | epochs | best valid (step) | final valid | "
          "test loss | test ppl | runs on the GPU at once | logged tok/s (median) | wall | peak GiB | status |",
          "|" + "---|" * 18]
    for r in runs:
        L.append(f"| `{r['name']}` | {r['preset']} | {r['arch']} | {r['optimizer']} | {r['lr']:g} | {r['batch_size']} x "
                 f"{r['seq_len']} | {r['steps']} | {r['tokens']:,} | {r['epochs']:.2f} | {r['best_val_loss']:.4f} "
                 f"({r['best_step']}) | {r['final_val_loss']:.4f} | {r['test_loss']:.4f} | {r['test_ppl']:.2f}"
                 f"{' (step ' + str(r['test_step']) + ')' if r['test_step'] != r['steps'] else ''} | {r['concurrent']} | "
                 f"{r['tokens_per_s']:,.0f} | {r['wall_s'] / 60:.1f} min | {r['max_mem_gib']} | {r['status']} |")
    L += ["", "- *runs on the GPU at once*: the most runs training at one moment of this run, from the start and end "
          "times in [timeline.jsonl](raw/campaign3/timeline.jsonl). *logged tok/s*: the median of the run's "
          "10-step log intervals (eval intervals left out) while it shared the GPU: **a share, not a solo number**; "
          f"only {alone} ran alone. *peak GiB*: `torch.cuda.max_memory_allocated`. *wall*: start to "
          "last log line. Test ppl of a run that stopped early is that of its best step.", "",
          f"![valid loss vs tokens]({PLOT})", ""]
    a, mlac, moec, mva = cl["architectures"], cl["mla_within_1pct"], cl["moe_6.9pct_better"], cl["muon_vs_adamw"]
    L += [f"## Seed claims at a real budget (54m, {fm(cl['budget_tokens'])} tokens each, one seed)", "",
          "| arch | params total / active | final valid | vs MHA | test loss | vs MHA | test ppl |", "|---|---|---|---|---|---|---|"]
    for name in ("mha", "mla-dense", "moe-mla-rope"):
        r = a[name]
        L.append(f"| {name} | {r['params_total'] / 1e6:.1f}M / {r['params_active'] / 1e6:.1f}M | {r['final_val_loss']:.4f} | "
                 f"{r['val_vs_mha_pct']:+.2f}% | {r['test_loss']:.4f} | {r['test_vs_mha_pct']:+.2f}% | {r['test_ppl']:.2f} |")
    muon_lrs = cl["muon_lr_54m"]
    L += ["",
          f"- **MoE-MLA-RoPE 6.9% better than MHA: {'held' if moec['held'] else 'not held'}.** It is better, by "
          f"{moec['val_pct']:+.2f}% valid and {moec['test_pct']:+.2f}% test loss, not {moec['claim_pct']}%. "
          f"(Campaign 2, at {fm(c2['moe-mla-rope']['tokens'])} tokens: {c2['moe-mla-rope']['delta_vs_mha_pct']:+.2f}%.)",
          f"- **MLA (r=d/2) within 1% of MHA: {'held' if mlac['held'] else 'not held'}** ({mlac['val_pct']:+.2f}% valid, "
          f"{mlac['test_pct']:+.2f}% test loss).",
          f"- **Muon vs AdamW (steps to AdamW's final valid loss): {mva['verdict']}.** AdamW (lr {by[ADAMW]['lr']:g}) ends at "
          f"{mva['adamw_final_val_loss']:.4f} after {mva['adamw_steps']} steps; Muon (lr {by[MUON]['lr']:g}) reaches it at step "
          f"{mva['muon_steps_interpolated']} (linear interpolation between its evals at "
          f"{mva['muon_first_eval_below'] - cfg['eval_every']} and {mva['muon_first_eval_below']}): ratio "
          f"**{mva['ratio']}** vs the claimed {mva['claim'][0]}-{mva['claim'][1]} (same model, batch and FLOPs per step, "
          f"so also the model-FLOP ratio). At the end Muon is {mva['muon_final_val_vs_adamw_pct']:+.2f}% in valid loss, test "
          f"ppl {mva['muon_test_ppl']:.2f} vs {mva['adamw_test_ppl']:.2f}. AdamW's lr {by[ADAMW]['lr']:g} was campaign 2's best at batch "
          f"{c2_batch} "
          "and was **not re-swept at batch 128**: a better-tuned AdamW would end lower and raise the ratio.",
          f"- **Muon lr at 54m**: 3e-3 -> valid {muon_lrs['0.003']['final_val_loss']:.4f} (test ppl "
          f"{muon_lrs['0.003']['test_ppl']:.2f}), 1e-2 -> {muon_lrs['0.01']['final_val_loss']:.4f} "
          f"({muon_lrs['0.01']['test_ppl']:.2f}). Only two points, and 3e-3 is at the **low edge of the grid**: a lower "
          "lr may be better still, so the Muon runs (and the ratio above) may be under-tuned too.",
          "- One seed per configuration, no repeat: differences of a few tenths of a percent are within what a second "
          "seed could move.", ""]
    p2, p5, p1 = pl["202m"], pl["54m"], pl["17m"]
    L += ["## Where valid loss stops improving, and what more data would buy", "",
          f"- **202m** ({p2['params'] / 1e6:.0f}M parameters): best valid loss {p2['best_val_loss']:.4f} at step "
          f"{p2['best_step']} ({fm(by[R202]['best_tokens'])} tokens, **{p2['best_epochs']:.2f} epochs**), then it rises by "
          f"{p2['rise_after_best']:.4f} to {p2['final_val_loss']:.4f} at the end while its train loss falls to "
          f"{p2['final_train_loss']:.2f}: it memorizes the corpus. Its valid loss was below the 54m's at the same step "
          f"up to step {p2['below_54m_until_step']} ({p2['below_54m_until_epochs']:.2f} epochs), above it after.",
          f"- **54m**: still improving at the end, barely: {p5['last_eval_gain']:.4f} nats over its last eval interval at "
          f"{p5['final_epochs']:.2f} epochs (train {p5['final_train_loss']:.2f} vs valid {p5['final_val_loss']:.2f}). "
          "The cosine schedule also ends there, so one run cannot split the flat end between data and schedule.",
          f"- **17m**: still gaining {p1['last_eval_gain']:.4f} nats per eval interval at {p1['final_epochs']:.2f} epochs; "
          "a longer run would help it.",
          f"- The corpus is {train_tokens / 1e6:.0f}M tokens. On this evidence a 202m-sized model needs fresh "
          f"tokens, not more passes: at a compute-optimal 20 tokens per parameter (Chinchilla) it would see {20 * p2['params'] / 1e9:.1f}B tokens = "
          f"{20 * p2['params'] / train_tokens:.0f} epochs of this corpus, and here it stopped gaining after "
          f"{p2['best_epochs']:.1f}. What more data would buy is what the 202m's early lead over the 54m shows: a larger "
          f"model keeps improving only while the tokens are new. The 54m ({cl['architectures']['moe-mla-rope']['params_active'] / 1e6:.1f}M "
          f"active parameters) is near its flat end at {p5['final_epochs']:.1f} epochs; the 17m is not.",
          "- Batch, at equal tokens (the 202m's first try at batch 64 vs the run at 128, different schedules in steps): "
          + "; ".join(f"{fm(x['tokens'])} tokens: {x['batch64']:.4f} vs {x['batch128']:.4f}"
                      for x in pl["202m_batch64_vs_128_same_tokens"])
          + ". The smaller batch is ahead early; batch 128 was chosen for speed, not from loss vs tokens.", ""]
    held = device["held_s"]
    L += ["## What was not done", "",
          "- **Throughput goals** (54m MoE-MLA-RoPE >= 1.2M tokens/s on one H200, 202m >= 25% MFU): **not worked on** "
          "this session, and **no solo throughput probes were run** "
          f"(device time: {device['device_s_used']} s of {device['budget_s']} s went to this campaign). The tokens/s in "
          "the runs table are shares of a shared GPU. The only run alone on the GPU, the 202m at batch 128, logged a "
          f"median {by[R202]['tokens_per_s']:,.0f} tokens/s and {100 * by[R202]['mfu']:.1f}% MFU (of {H100_BF16_PEAK / 1e12:.0f} "
          "TFLOP/s bf16, the H100's and the H200's dense peak; model FLOPs): a training log, not a probe, and far from 25%.",
          f"- **Multi-GPU**: no several-GPU kind was lent{'' if not device['multi_gpu_kind_lent'] else ' (one was)'}; "
          "no torchrun run this campaign.",
          "- Not re-swept at batch 128: AdamW's lr, the batch size, the router-bias rate; Muon's lr only at two points "
          f"(54m). One seed. The 17m's Muon lr ({by[R17]['lr']:g}) was campaign 2's best at batch {c2_batch}; the 202m's "
          f"({by[R202]['lr']:g}) was never swept.", "",
          "## Device time, wall times and what went wrong", "",
          f"Device time: **{device['device_s_used']} s of the session's {device['budget_s']} s** (held {held} s), one "
          f"{device['kind']}, five calls:", "",
          "| call | UTC | what |", "|---|---|---|"]
    L += [f"| {c['call']} | {c['utc']} | {c['what']} |" for c in device["calls"]]
    L += ["",
          f"- **First launch: out of memory.** {mem['processes']} runs started at once; CUDA's message lists "
          f"{mem['in_use_gib']:.1f} of {mem['capacity_gib']:.1f} GiB in use, the {len(mem['others_gib'])} other processes "
          f"holding {min(mem['others_gib']):.1f}-{max(mem['others_gib']):.1f} GiB each. Two died at their first step ("
          + "; ".join(f"`{x['run']}` {x['start_utc']}-{x['end_utc']}: {x['error']}" for x in attempts)
          + f"). They were relaunched with `--force` in call 2 at {relaunch.strftime('%H:%M:%S')}, when "
          f"{len(still)} runs were still training ({', '.join(still)}). Budget GPU memory per run before launching "
          "several: *peak GiB* above is PyTorch's part only.",
          f"- **The 202m at batch 64 was lost to the tree copy.** It died at step {by[R202_B64]['steps']} of "
          f"{by[R202_B64]['planned_steps']} with `{by[R202_B64]['error']}`: each device call re-copies "
          "the working tree, and the run copied the tokenizer from the repository into OUT/best at each new best, at a "
          "moment the file was absent. (`train.py` now keeps the run's own copy.) Its best weights (step "
          f"{by[R202_B64]['best_step']}, {fm(by[R202_B64]['best_tokens'])} tokens) scored test ppl "
          f"{by[R202_B64]['test_ppl']:.2f} ([test_ppl-call3.jsonl](raw/campaign3/test_ppl-call3.jsonl)). The 202m was "
          "relaunched alone at batch 128 in call 4 with `--tokenizer /tmp/tokenizer.json`.",
          "- Wall times (start to last log line): " + ", ".join(
              f"{r['name']} {r['start_utc']}-{r['end_utc']} ({r['wall_s'] / 60:.1f} min)" for r in runs) + ".", "",
          "## Commands", "",
          "Every `perseus train` command started, in order ([runs.jsonl](raw/campaign3/runs.jsonl)); the first two "
          "launches of the 17m and 54m lr 1e-2 runs are the ones that died of OOM.", ""]
    L += [f"{i}. `{row['command']}`" for i, row in enumerate(read_jsonl(RAW / "runs.jsonl"), 1)]
    return "\n".join(L) + "\n"


def report(before: dict, c2_arch: dict, c2_muon: dict, landed: dict) -> list[dict]:
    """Write README.md, campaign3.json and the plot; return the run records (for summary.json).
    `before`: test_ppl.json's entries of the models committed before this campaign; `c2_arch`,
    `c2_muon`: campaign 2's arch_54m.json and muon_vs_adamw.json; `landed`: test_ppl.json's CPU
    evals of this campaign's weights once committed."""
    device = json.loads((RAW / "device.json").read_text())
    runs, attempts = load(device)
    by = {r["name"]: r for r in runs}
    mod, cl, pl, mem = models(by, before, landed), claims(by), plateau(by, device), oom_memory(attempts)
    plot(runs, device["prepare"]["train_tokens"])
    (RESULTS / "campaign3.json").write_text(json.dumps(
        {"models": mod, "seed_claims": cl, "plateau": pl, "oom": mem, "attempts_died": attempts,
         "device": {k: device[k] for k in ("kind", "budget_s", "device_s_used", "held_s", "multi_gpu_kind_lent")}},
        indent=1) + "\n")
    assert c2_muon["54m"]["adamw_best_lr"] == by[ADAMW]["lr"] and c2_muon["17m"]["muon_best_lr"] == by[R17]["lr"]
    (RESULTS / "README.md").write_text(write_readme(runs, attempts, device, mod, cl, pl, mem, c2_arch, c2_muon))
    return runs
