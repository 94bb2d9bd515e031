"""Training report of campaign 2 (issue 4): raw device outputs -> tables, verdicts and plots.

Reads `studies/results/training/raw/` (campaign 2: call5-call8, ddp, balance; see studies/gpu/README.md
for the device calls that wrote them) and writes, next to it: muon_vs_adamw.json, arch_54m.json,
throughput.json, the plots and README-campaign2.md; `report()` returns one record per run for
summary.json. Every number in that README is computed here from those files. Run through
`python studies/training_report.py` (all campaigns).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from perseus_edge.model.config import preset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "training"
RAW = RESULTS / "raw"
WAVES = {"call5": "17m", "call6": "54m", "call8": "202m"}  # the calls whose runs.jsonl lists a wave
SEED_MUON_RATIO = (0.48, 0.52)  # arXiv 2509.24406: Muon needs 48-52% of AdamW's compute
SEED_MOE_GAIN = 6.9  # % lower val loss of MoE-MLA-RoPE vs a vanilla transformer at 53.9M (arXiv 2508.01261)
MFU_GOAL = 0.35
DATA_TOKENS = 26_352_696  # tokens of the train prefix carried to the device ("train: ... tokens" in each call)


# ----------------------------------------------------------------------------- loading
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def option(cmd: str, name: str) -> str | None:
    m = re.search(rf"--{name} (\S+)", cmd)
    return m.group(1) if m else None


def steady_median(log: list[dict], key: str) -> float | None:
    """Median over the log records that time plain training steps: not the first (warm-up,
    start-up), not eval records (their interval includes the evaluation)."""
    xs = [r[key] for r in log[1:] if key in r and "val_loss" not in r]
    return statistics.median(xs) if xs else None


def load_runs() -> list[dict]:
    commands = {}  # run folder name -> (command, rc, processes sharing the GPU)
    for call in WAVES:
        for row in read_jsonl(RAW / call / "runs.jsonl"):
            commands[row["name"]] = (call, row["command"], row["rc"], row["concurrent"])
    for call, together in (("balance", True), ("ddp", False)):  # balance ran its runs at once, ddp one by one
        lines = (RAW / call / "commands.txt").read_text().splitlines()
        for line in lines:
            cmd = line.split(": ", 1)[-1]
            commands[Path(re.search(r" -o (\S+)", cmd).group(1)).name] = (call, cmd, 0, len(lines) if together else 1)
    runs = []
    for name, (call, cmd, rc, concurrent) in commands.items():
        log = read_jsonl(RAW / call / name / "log.jsonl")
        vals = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
        nproc = 2 if "nproc_per_node=2" in cmd else 1
        runs.append({
            "call": call, "name": name, "preset": option(cmd, "preset"), "arch": option(cmd, "arch"),
            "optimizer": option(cmd, "optimizer"), "lr": float(option(cmd, "lr")),
            "adam_lr": float(option(cmd, "adam-lr")), "router_bias_rate": float(option(cmd, "router-bias-rate") or 1e-3),
            "gpus": nproc, "steps": log[-1]["step"], "tokens": log[-1]["tokens"], "flops": log[-1]["flops"],
            "final_val_loss": vals[-1][1], "final_train_loss": log[-1]["loss"],
            "tokens_per_s": steady_median(log, "tokens_per_s"), "mfu": steady_median(log, "mfu"),
            "max_mem_gib": log[-1].get("max_mem_gib"), "concurrent": concurrent,
            "expert_load_final": log[-1].get("expert_load_max_over_mean") or None,
            "command": cmd, "status": "finished" if rc == 0 and log[-1]["step"] == int(option(cmd, "steps")) else f"rc={rc}",
            "_log": log, "_vals": vals,
        })
    return runs


def load_probes() -> list[dict]:
    rows = []
    for call in ("call7", "call8"):
        rows += [{"call": call, **r} for r in read_jsonl(RAW / call / "probe.jsonl")]
    return rows


# ----------------------------------------------------------------------------- analysis
def sweep(runs: list[dict], preset_name: str) -> list[dict]:
    return [r for r in runs if r["preset"] == preset_name and r["arch"] == "moe-mla-rope" and r["call"] in WAVES]


def crossing(vals: list[tuple[int, float]], target: float) -> tuple[int | None, float | None]:
    """First eval step whose val loss <= target, and the step linearly interpolated between evals."""
    for (s0, v0), (s1, v1) in zip([(0, math.inf)] + vals, vals):
        if v1 <= target:
            return s1, (s1 if math.isinf(v0) else s0 + (v0 - target) / (v0 - v1) * (s1 - s0))
    return None, None


def muon_vs_adamw(runs: list[dict]) -> dict:
    out = {"seed_claim": "Muon reaches AdamW's final loss with 48-52% of AdamW's compute (arXiv 2509.24406)"}
    for p in ("17m", "54m"):
        rs = sweep(runs, p)
        by = {o: sorted((r for r in rs if r["optimizer"] == o), key=lambda r: r["lr"]) for o in ("muon", "adamw")}
        best = {o: min(by[o], key=lambda r: r["final_val_loss"]) for o in by}
        target = best["adamw"]["final_val_loss"]
        step, interp = crossing(best["muon"]["_vals"], target)
        ratio = round(interp / best["adamw"]["steps"], 3)
        lo, hi = SEED_MUON_RATIO
        verdict = ("held" if lo <= ratio <= hi else "held, within 0.05 of the range" if lo - 0.05 <= ratio <= hi + 0.05
                   else "Muon saved more" if ratio < lo else "not held")
        out[p] = {
            "adamw_best_lr": best["adamw"]["lr"], "adamw_final_val_loss": target,
            "muon_best_lr": best["muon"]["lr"], "muon_final_val_loss": best["muon"]["final_val_loss"],
            "adamw_steps": best["adamw"]["steps"], "tokens_per_step": best["adamw"]["tokens"] // best["adamw"]["steps"],
            "muon_steps_to_adamw_loss": step, "muon_steps_to_adamw_loss_interpolated": round(interp, 1),
            "eval_every": best["muon"]["_vals"][0][0], "ratio": ratio, "ratio_at_eval_step": round(step / best["adamw"]["steps"], 3),
            "flops_ratio": ratio,
            "swept": {o: {f"{r['lr']:g}": r["final_val_loss"] for r in by[o]} for o in by},
            "best_lr_bracketed": {o: by[o][0] is not best[o] and by[o][-1] is not best[o] for o in by},
            "verdict": verdict,
        }
    out["note"] = ("ratio = Muon steps to the best AdamW run's final val loss (linear interpolation between "
                   "evals) / AdamW's steps; same model, batch and FLOPs per step, so it is also the model-FLOP "
                   "ratio (Newton-Schulz FLOPs excluded). 'held' means within 0.05 of the claimed 0.48-0.52.")
    return out


def arch_54m(runs: list[dict], probes: list[dict]) -> dict:
    rows = {}
    mha = next(r for r in runs if r["name"] == "54m-mha-muon-lr0.003")["final_val_loss"]
    for name in ("54m-mha-muon-lr0.003", "54m-mla-dense-muon-lr0.003", "54m-moe-mla-rope-muon-lr0.003"):
        r = next(x for x in runs if x["name"] == name)
        cfg = preset("54m", r["arch"])
        counts = cfg.param_counts()
        solo = [p for p in probes if p["preset"] == "54m" and p["arch"] == r["arch"] and p["muon_impl"] == "grouped"
                and not p["compile"] and p["optimizer"] == "muon"]
        rows[r["arch"]] = {
            "final_val_loss": r["final_val_loss"], "val_ppl": round(math.exp(r["final_val_loss"]), 2),
            "delta_vs_mha_pct": round(100 * (r["final_val_loss"] - mha) / mha, 2),
            "kv_bytes_per_token_fp32": cfg.kv_bytes_per_token(4), "kv_bytes_per_token_bf16": cfg.kv_bytes_per_token(2),
            "params_total": counts["total"], "params_active": counts["active"], "tokens": r["tokens"],
            "solo_tokens_per_s": solo[-1]["tokens_per_s"] if solo else None,
            "expert_load_final": r["expert_load_final"],
        }
    mla, moe = rows["mla-dense"]["delta_vs_mha_pct"], rows["moe-mla-rope"]["delta_vs_mha_pct"]
    rows["verdicts"] = {
        "mla_costs_under_1pct": f"{'held' if mla < 1 else 'not held'}: MLA (r=d/2) vs MHA {mla:+.2f}% val loss",
        "moe_mla_rope_6.9pct_better": (f"{'held' if -moe >= SEED_MOE_GAIN - 1 else 'not held'}: MoE-MLA-RoPE vs MHA "
                                       f"{moe:+.2f}% val loss (claim -{SEED_MOE_GAIN}%)"),
    }
    return rows


def throughput(probes: list[dict], runs: list[dict]) -> dict:
    def find(call, p, arch="moe-mla-rope", opt="muon", impl="grouped", comp=False):
        return next((r for r in probes if r["call"] == call and r["preset"] == p and r["arch"] == arch
                     and r["optimizer"] == opt and r["muon_impl"] == impl and r["compile"] == comp), None)

    muon_speedup = {p: round(find("call7", p, impl="torch")["step_ms"] / find("call7", p)["step_ms"], 2)
                    for p in ("17m", "54m")}
    compile_gain = {f"{p} {a}": round(find(c, p, a)["step_ms"] / find(c, p, a, comp=True)["step_ms"], 2)
                    for c, p, a in (("call8", "54m", "moe-mla-rope"), ("call8", "202m", "moe-mla-rope"), ("call7", "54m", "mha"))}
    big = find("call8", "202m", comp=True)
    ddp = {r["name"]: r for r in runs if r["call"] == "ddp"}
    one = ddp["gpu1-batch32"]["tokens_per_s"]
    return {
        "probes": [{k: v for k, v in r.items() if k not in ("device", "gpu")} for r in probes],
        "groupedmuon_speedup_vs_torch_muon": muon_speedup,
        "compile_speedup": compile_gain,
        "largest_preset_trained": {"preset": "202m", "mfu_eager": find("call8", "202m")["mfu"], "mfu_compiled": big["mfu"],
                                   "goal": MFU_GOAL, "met": big["mfu"] >= MFU_GOAL},
        "ddp_h200": {
            "tokens_per_s": {k: r["tokens_per_s"] for k, r in ddp.items()},
            "strong_scaling_speedup": round(ddp["gpu2-batch16"]["tokens_per_s"] / one, 2),
            "weak_scaling_speedup": round(ddp["gpu2-batch32"]["tokens_per_s"] / one, 2),
            "val_loss_1gpu_vs_2gpu_same_global_batch": [ddp["gpu1-batch32"]["final_val_loss"],
                                                        ddp["gpu2-batch16"]["final_val_loss"]],
        },
        "projection_202m": projection(big),
    }


def projection(probe: dict) -> dict:
    params = preset("202m").param_counts()["total"]
    tokens = 20 * params  # a compute-optimal budget (Chinchilla: ~20 tokens per parameter)
    return {"params": params, "tokens_20_per_param": tokens, "tokens_per_s_compiled_h100": probe["tokens_per_s"],
            "h100_hours": round(tokens / probe["tokens_per_s"] / 3600, 1),
            "epochs_of_the_device_train_prefix": round(tokens / DATA_TOKENS, 1)}


# ----------------------------------------------------------------------------- plots
def plot_sweeps(runs: list[dict], target: dict) -> list[str]:
    names = []
    for p in ("17m", "54m"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in sorted(sweep(runs, p), key=lambda r: (r["optimizer"], r["lr"])):
            steps, vals = zip(*r["_vals"])
            per_step = r["flops"] / r["steps"]
            style = dict(ls="-" if r["optimizer"] == "muon" else "--", marker=".", label=f"{r['optimizer']} lr {r['lr']:g}")
            axes[0].plot(steps, vals, **style)
            axes[1].plot([s * per_step for s in steps], vals, **style)
        for ax, xl in zip(axes, ("step (16,384 tokens each)", "model FLOPs (fwd + bwd)")):
            ax.axhline(target[p]["adamw_final_val_loss"], color="grey", lw=0.8, ls=":")
            ax.set_xlabel(xl)
            ax.set_ylabel("validation loss (nats/token)")
            ax.set_ylim(top=6.5)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8, ncol=2)
        fig.suptitle(f"{p} MoE-MLA-RoPE: Muon (solid) vs AdamW (dashed); dotted = best AdamW final val loss")
        fig.tight_layout()
        names.append(f"loss_vs_step_{p}.png")
        fig.savefig(RESULTS / names[-1], dpi=110)
        plt.close(fig)
    return names


def plot_arch(runs: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("54m-mha-muon-lr0.003", "54m-mla-dense-muon-lr0.003", "54m-moe-mla-rope-muon-lr0.003"):
        r = next(x for x in runs if x["name"] == name)
        steps, vals = zip(*r["_vals"])
        ax.plot([s * r["tokens"] / r["steps"] / 1e6 for s in steps], vals, marker=".", label=r["arch"])
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=6.0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("54m architectures, Muon lr 3e-3, same tokens and schedule")
    fig.tight_layout()
    fig.savefig(RESULTS / "arch_54m.png", dpi=110)
    plt.close(fig)
    return "arch_54m.png"


def plot_expert_load(runs: list[dict]) -> str:
    pick = [("54m-moe-mla-rope-muon-lr0.003", "bias rate 1e-3 (DeepSeek-V3)"),
            ("54m-moe-mla-rope-muon-lr0.003-bias1e-2", "bias rate 1e-2")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (name, title) in zip(axes, pick):
        r = next(x for x in runs if x["name"] == name)
        rows = [x for x in r["_log"] if "expert_load_max_over_mean" in x]
        for layer in range(len(rows[0]["expert_load_max_over_mean"])):
            ax.plot([x["step"] for x in rows], [x["expert_load_max_over_mean"][layer] for x in rows], label=f"layer {layer}")
        ax.axhline(62 / 6, color="grey", ls=":", lw=0.8)
        ax.set_title(f"54m Muon lr 3e-3, {title}: final val {r['final_val_loss']:.4f}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("max / mean expert load per layer (1 = balanced)")
    fig.suptitle("Router balance; dotted line 10.33 = every token on the same 6 of 62 experts")
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "expert_load.png", dpi=110)
    plt.close(fig)
    return "expert_load.png"


# ----------------------------------------------------------------------------- README
def fmt_loss(x):
    return f"{x:.4f}" if x is not None else "-"


def write_readme(runs, mva, arch, thr, test_ppl) -> str:
    L = ["<!-- generated by `python studies/training_report.py` from raw/: do not edit by hand -->",
         "# Training results (issue 4), campaign 2",
         "",
         "MoE-MLA-RoPE family on one lent H100 80GB (calls 5-8, `balance`) and one 2 x H200 host (`ddp`); the device "
         "calls and the scripts are in [studies/gpu/README.md](../../gpu/README.md). Every run: batch 32 x 512 = 16,384 "
         "tokens/step, bf16 autocast, seed 0, warmup + cosine; val loss on 16 x 32 x 512 = 262,144 valid tokens. "
         "Campaign 1 (padded experts, per-matrix Muon, mostly OOM) is kept as history in "
         "[README-campaign1.md](README-campaign1.md) with its raw data in raw/call1-4; campaign 3 (the whole corpus, "
         "105M tokens per run, H200) is the main report, [README.md](README.md).",
         "",
         "## Muon vs AdamW (MoE-MLA-RoPE)",
         "",
         "| preset | AdamW best lr | AdamW final val | Muon best lr | Muon final val | Muon steps to AdamW's final val | ratio | seed 0.48-0.52 |",
         "|---|---|---|---|---|---|---|---|"]
    for p in ("17m", "54m"):
        m = mva[p]
        L.append(f"| {p} | {m['adamw_best_lr']:g} | {m['adamw_final_val_loss']:.4f} | {m['muon_best_lr']:g} | "
                 f"{m['muon_final_val_loss']:.4f} | {m['muon_steps_to_adamw_loss_interpolated']} of {m['adamw_steps']} "
                 f"(first eval below: {m['muon_steps_to_adamw_loss']}) | **{m['ratio']}** | {m['verdict']} |")
    L += ["", "Swept (final val loss): " + "; ".join(
        f"{p} {o} " + ", ".join(f"{lr}: {v:.4f}" for lr, v in mva[p]["swept"][o].items())
        for p in ("17m", "54m") for o in ("muon", "adamw")) + ". Best lrs are interior to every grid: "
        + str(all(all(mva[p]["best_lr_bracketed"].values()) for p in ("17m", "54m"))) + ".",
        "", mva["note"] + " At the end Muon is also "
        + ", ".join(f"{100 * (mva[p]['adamw_final_val_loss'] - mva[p]['muon_final_val_loss']) / mva[p]['adamw_final_val_loss']:.1f}% ({p})" for p in ("17m", "54m"))
        + " lower in val loss at equal steps.",
        "", "![17m](loss_vs_step_17m.png)", "![54m](loss_vs_step_54m.png)", "",
        "## Architectures at 54m (Muon lr 3e-3, same tokens)", "",
        "| arch | params total / active | KV bytes/token (bf16) | final val | val ppl | vs MHA | solo train tok/s (H100) |",
        "|---|---|---|---|---|---|---|"]
    for a in ("mha", "mla-dense", "moe-mla-rope"):
        r = arch[a]
        L.append(f"| {a} | {r['params_total'] / 1e6:.1f}M / {r['params_active'] / 1e6:.1f}M | {r['kv_bytes_per_token_bf16']:,} | "
                 f"{r['final_val_loss']:.4f} | {r['val_ppl']} | {r['delta_vs_mha_pct']:+.2f}% | {r['solo_tokens_per_s'] or 0:,.0f} |")
    tokens = arch["moe-mla-rope"]["tokens"]
    L += ["", f"- {arch['verdicts']['mla_costs_under_1pct']}.", f"- {arch['verdicts']['moe_mla_rope_6.9pct_better']}.",
          f"- At this budget ({tokens / 1e6:.1f}M tokens, ~0.1 token per parameter) the comparison is of early training, "
          "not of converged models; one seed. The MoE's routing was still far from balanced at the end (max/mean expert "
          f"load per layer {arch['moe-mla-rope']['expert_load_final']}), see the router-balance section.",
          "", "![arch](arch_54m.png)", ""]
    bal = sorted((r for r in runs if r["call"] == "balance" or r["name"] == "54m-moe-mla-rope-muon-lr0.003"),
                 key=lambda r: r["router_bias_rate"])
    L += ["## Router balance (aux-loss-free bias update rate, 54m)", "",
          "| bias update per step | final val | max/mean expert load per layer at the end |", "|---|---|---|"]
    L += [f"| {r['router_bias_rate']:g} | {r['final_val_loss']:.4f} | {r['expert_load_final']} |" for r in bal]
    L += ["", "DeepSeek-V3's 1e-3 is made for trillions of tokens; in 350 steps it leaves several layers routing most "
          "tokens to a few experts. 3e-3 to 1e-2 balance the load (max/mean 1.3-2.0) but gain only "
          f"{bal[0]['final_val_loss'] - min(r['final_val_loss'] for r in bal):.4f} nats of val loss here.",
          "", "![load](expert_load.png)", "",
          "## Throughput and MFU (solo, H100, bf16)", "",
          "| call | preset | arch | optimizer | Muon impl | compile | step ms | tokens/s | MFU | peak GiB |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in thr["probes"]:
        L.append(f"| {r['call']} | {r['preset']} | {r['arch']} | {r['optimizer']} | {r['muon_impl']} | {r['compile']} | "
                 f"{r['step_ms']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.2f}% | {r['max_mem_gib']} |")
    big = thr["largest_preset_trained"]
    L += ["", "- GroupedMuon vs torch.optim.Muon, whole training step: " + ", ".join(
              f"{v}x faster at {k}" for k, v in thr["groupedmuon_speedup_vs_torch_muon"].items()) + ".",
          "- Regional torch.compile (each decoder layer), step-time speedup: " + ", ".join(
              f"{v}x ({k})" for k, v in thr["compile_speedup"].items()) + ".",
          f"- MFU goal {100 * MFU_GOAL:.0f}% on the largest preset trained (202m): **not met** - {100 * big['mfu_eager']:.2f}% eager, "
          f"{100 * big['mfu_compiled']:.2f}% compiled. These models are too small for an H100: a step is bound by "
          "per-kernel host work (17m and 54m MoE steps take the same ~140 ms for 3x the FLOPs), not by the tensor cores. "
          "call7 was measured before and call8 after removing a host sync (bincount) from the router: no difference.",
          "- Runs in a wave share the GPU, so the per-run tok/s in the runs table are shares, not solo numbers.", ""]
    d = thr["ddp_h200"]
    L += ["## Two GPUs (torchrun, NCCL, 2 x H200)", "",
          f"54m MoE-MLA-RoPE, 120 steps: 1 GPU x batch 32: {d['tokens_per_s']['gpu1-batch32']:,.0f} tok/s; "
          f"2 GPUs x batch 16 (same global batch): {d['tokens_per_s']['gpu2-batch16']:,.0f} tok/s (**{d['strong_scaling_speedup']}x**); "
          f"2 GPUs x batch 32: {d['tokens_per_s']['gpu2-batch32']:,.0f} tok/s (**{d['weak_scaling_speedup']}x**). "
          "Halving the per-GPU batch does not halve a host-bound step, so only weak scaling pays. Same global batch on "
          f"1 and 2 GPUs gives the same val loss to {abs(d['val_loss_1gpu_vs_2gpu_same_global_batch'][0] - d['val_loss_1gpu_vs_2gpu_same_global_batch'][1]):.4f} "
          f"({d['val_loss_1gpu_vs_2gpu_same_global_batch'][0]} vs {d['val_loss_1gpu_vs_2gpu_same_global_batch'][1]}); "
          "the CPU test `tests/test_train.py::test_two_process_ddp_matches_one_process` checks this with gloo.", ""]
    r202 = next(r for r in runs if r["preset"] == "202m")
    pj = thr["projection_202m"]
    L += ["## 202m", "",
          f"Trained for {r202['steps']} steps ({r202['tokens'] / 1e6:.1f}M tokens, Muon lr 3e-3, solo): val loss "
          f"{r202['final_val_loss']:.4f}, vs 54m {arch['moe-mla-rope']['final_val_loss']:.4f} and 17m "
          f"{mva['17m']['muon_final_val_loss']:.4f} after 5-6M tokens. A compute-optimal run "
          f"(20 tokens/parameter = {pj['tokens_20_per_param'] / 1e9:.1f}B tokens) at the compiled "
          f"{pj['tokens_per_s_compiled_h100']:,.0f} tok/s would take {pj['h100_hours']} H100-hours, and "
          f"{pj['epochs_of_the_device_train_prefix']} epochs of the corpus (26.4M tokens): data-bound before it is compute-bound.", ""]
    L += ["## Shipped models (at the end of campaign 2)", "",
          f"- `models/perseus-54m-moe-mla-rope/`: run `54m-moe-mla-rope-muon-lr0.003` (val {arch['moe-mla-rope']['final_val_loss']:.4f}); "
          f"test perplexity **{test_ppl['models/perseus-54m-moe-mla-rope']['ppl']:.2f}** over "
          f"{test_ppl['models/perseus-54m-moe-mla-rope']['tokens']:,} tokens (`{test_ppl['models/perseus-54m-moe-mla-rope']['command']}`).",
          f"- `perseus_edge/assets/default/` (embedded): still campaign 1's 17m Muon run, test perplexity "
          f"{test_ppl['perseus_edge/assets/default']['ppl']}. Campaign 2's best 17m run (Muon lr 1e-2, val "
          f"{mva['17m']['muon_final_val_loss']:.4f} at seq 512) was not committed: ~1% better for a second 35 MB model in git history.",
          "", "## Runs", "",
          "| # | call | run | steps | tokens | final val | final train | tok/s (shared) | runs sharing the GPU | status |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        L.append(f"| [{i}](#c{i}) | {r['call']} | {r['name']} | {r['steps']} | {r['tokens']:,} | {fmt_loss(r['final_val_loss'])} | "
                 f"{fmt_loss(r['final_train_loss'])} | {r['tokens_per_s']:,.0f} | {r['concurrent']} | {r['status']} |")
    L += ["", "## Commands", ""]
    for i, r in enumerate(runs, 1):
        L.append(f"<a id=\"c{i}\"></a>{i}. `{r['command']}`")
    return "\n".join(L) + "\n"


def report() -> list[dict]:
    """Write campaign 2's README-campaign2.md, json and plots; return its run records (for summary.json)."""
    runs = load_runs()
    probes = load_probes()
    mva = muon_vs_adamw(runs)
    for r in runs:  # steps_to_target: Muon sweep runs vs their preset's best AdamW final val loss
        target = mva.get(r["preset"], {}).get("adamw_final_val_loss")
        r["steps_to_target"] = crossing(r["_vals"], target)[0] if target and r["optimizer"] == "muon" else None
    arch = arch_54m(runs, probes)
    thr = throughput(probes, runs)
    test_ppl = json.loads((RESULTS / "test_ppl.json").read_text())
    (RESULTS / "muon_vs_adamw.json").write_text(json.dumps(mva, indent=1))
    (RESULTS / "arch_54m.json").write_text(json.dumps(arch, indent=1))
    (RESULTS / "throughput.json").write_text(json.dumps(thr, indent=1))
    plot_sweeps(runs, mva)
    plot_arch(runs)
    plot_expert_load(runs)
    (RESULTS / "README-campaign2.md").write_text(write_readme(runs, mva, arch, thr, test_ppl))
    return runs
