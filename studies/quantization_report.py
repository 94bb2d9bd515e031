"""Quantization report: perplexity, size, peak RSS and decode speed of every scheme.

    python studies/quantization_report.py                 # ~15 min on 2 cores; writes studies/results/quantization/
    python studies/quantization_report.py --decode DIR    # one decode measurement (JSON), used by the report

Models: the embedded trained 17M model (perseus_edge/assets/default) and the trained 54M one
(models/perseus-54m-moe-mla-rope). Schemes: fp32 (the export), fp16, int8, int4, int4 + int8
cache, and the int8 cache alone; fp32 / int8 / int4 also with the exporter's `ort-cpu` target
(experts in com.microsoft.QMoE).

Every number comes from the CLI a user would run (`perseus export`, `perseus quantize`,
`perseus eval --split test --json`) or, for speed and memory, from a fresh process per folder
running the runtime's Generator (peak RSS = that process's high-water mark). Decode speed is
the median over rounds; in each round every folder runs once (round-robin), so load from other
jobs on the shared machine spreads over all schemes alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "studies" / "results" / "quantization"
# (record name, short name, trained checkpoint folder relative to REPO, work sub-folder)
MODELS = [("default-17m", "17M", "perseus_edge/assets/default", "default"),
          ("54m-trained", "54M", "models/perseus-54m-moe-mla-rope", "54m")]
PROMPT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
          "nothing to do")
# (label, quantize arguments); None = the fp32 export itself
SCHEMES = [
    ("fp32", None),
    ("fp16", ["--scheme", "fp16"]),
    ("int8", ["--scheme", "int8"]),
    ("int4", ["--scheme", "int4"]),
    ("int4+kv8", ["--scheme", "int4", "--kv-cache", "int8"]),
    ("fp32+kv8", ["--scheme", "fp32", "--kv-cache", "int8"]),
]
ORT_CPU_SCHEMES = ["fp32", "int8", "int4"]
GOALS = {"int8": 1.0, "int4": 3.0}
# what would close a missed goal (measured levers, quantize/README.md)
CLOSE = {"int8": "keep the embedding table and LM head fp32 (--embeddings fp32 --lm-head fp32), or use "
                 "weight-only 8-bit MatMulNBits (int8 activations per block of 32 instead of per tensor)",
         "int4": "--lm-head int8 (-0.3 points on the 17m model), --method hqq (-0.2, slow on onnxruntime 1.32), "
                 "--block-size 16, or a calibrated method (GPTQ/AWQ) on the train split"}


def perseus(*args: str, capture: bool = True) -> str:
    cmd = [sys.executable, "-m", "perseus_edge.cli", *args]
    p = subprocess.run(cmd, capture_output=capture, text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(f"failed: perseus {' '.join(args)}\n{p.stderr}")
    return p.stdout


def data_dir() -> Path:
    """The folder `perseus eval` reads ($PERSEUS_DATA_DIR, else the full corpus beside the checkout,
    else the sample committed with the repository, which holds the whole test split)."""
    from perseus_edge.data import resolve_data_dir

    d = resolve_data_dir()
    if not (d / "test.txt.xz").is_file():
        raise SystemExit(f"no test.txt.xz in {d}: set PERSEUS_DATA_DIR")
    return d


def folder_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.iterdir() if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.name.startswith("model.onnx"))
    return sum(p.stat().st_size for p in files), weights


# ----------------------------------------------------------------------------- one decode run
def decode(folder: str, threads: int, tokens: int) -> dict:
    """Load, warm up, then generate `tokens` greedy tokens after PROMPT; timings and memory."""
    from perseus_edge.runtime import Generator
    from perseus_edge.runtime.timings import anon_rss_bytes, peak_rss_bytes

    gen = Generator(folder, threads=threads)
    gen.generate(PROMPT, 8, temperature=0, ignore_eos=True)
    result = gen.generate(PROMPT, tokens, temperature=0, ignore_eos=True)
    t = result.timings
    return {"decode_tok_s": t.decode_tok_s, "prompt_tok_s": t.prompt_tok_s, "load_s": gen.load_s,
            "peak_rss_bytes": peak_rss_bytes(), "anon_rss_bytes": anon_rss_bytes(),
            "cache_bytes": gen.model.cache.nbytes, "threads": threads}


def measure_decode(folders: dict[str, Path], threads: int, tokens: int, rounds: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {k: [] for k in folders}
    for r in range(rounds):
        for key, folder in folders.items():
            p = subprocess.run([sys.executable, __file__, "--decode", str(folder), "--threads", str(threads),
                                "--decode-tokens", str(tokens)], capture_output=True, text=True, cwd=REPO)
            if p.returncode:
                raise SystemExit(f"decode run failed for {folder}:\n{p.stderr}")
            runs[key].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"  decode round {r + 1}/{rounds} {key}: {runs[key][-1]['decode_tok_s']:.1f} tok/s", flush=True)
    out = {}
    for key, rs in runs.items():
        rates = [x["decode_tok_s"] for x in rs]
        out[key] = {"decode_tok_s": statistics.median(rates), "decode_tok_s_runs": [round(x, 1) for x in rates],
                    "prompt_tok_s": statistics.median(x["prompt_tok_s"] for x in rs),
                    "peak_rss_bytes": int(statistics.median(x["peak_rss_bytes"] for x in rs)),
                    "anon_rss_bytes": int(statistics.median(x["anon_rss_bytes"] for x in rs)),
                    "load_s": statistics.median(x["load_s"] for x in rs), "cache_bytes": rs[0]["cache_bytes"]}
    return out


# ----------------------------------------------------------------------------- the report
def run_model(name: str, fp32: Path, work: Path, batches: int, args, schemes, export_target: str) -> list[dict]:
    folders = {}
    for label, qargs in schemes:
        if qargs is None:
            folders[label] = fp32
            continue
        out = work / label.replace("+", "-")
        perseus("quantize", str(fp32), "-o", str(out), *qargs, "--force")
        folders[label] = out
    records = []
    data = data_dir()
    for label, folder in folders.items():
        start = time.perf_counter()
        res = json.loads(perseus("eval", str(folder), "--split", "test", "--json", "--max-batches", str(batches),
                                 "--threads", str(args.threads), "--data-dir", str(data)).strip().splitlines()[-1])
        print(f"  {name} {export_target} {label}: ppl {res['ppl']:.3f} on {res['tokens']} tokens "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
        manifest = json.loads((folder / "manifest.json").read_text())
        size, weights = folder_bytes(folder)
        records.append({"model": name, "scheme": label, "export_target": export_target, "kind": manifest["kind"],
                        "ppl": res["ppl"], "loss": res["loss"], "tokens": res["tokens"], "size_bytes": size,
                        "weights_bytes": weights, "quantization": manifest.get("quantization"),
                        "lowering": manifest.get("lowering"), "folder": str(folder)})
    speed = measure_decode(folders, args.threads, args.decode_tokens, args.rounds)
    base = next(r for r in records if r["scheme"] == "fp32")
    for r in records:
        r.update(speed[r["scheme"]])
        r["ppl_delta_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
        r["size_ratio"] = r["size_bytes"] / base["size_bytes"]
        r["speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/perseus-quantization-report"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches-17m", type=int, default=16, help="test batches of 8 x 256 tokens (17m)")
    ap.add_argument("--batches-54m", type=int, default=16, help="test batches of 8 x 256 tokens (54m)")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-ort-cpu", action="store_true", help="skip the ort-cpu export rows")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite README.md and size_vs_ppl.png from OUT/quality.json (no measuring)")
    args = ap.parse_args()
    if args.decode:
        print(json.dumps(decode(args.decode, args.threads, args.decode_tokens)))
        return
    if args.render:
        data = json.loads((args.out / "quality.json").read_text())
        plot(data["records"], args.out / "size_vs_ppl.png")
        (args.out / "README.md").write_text(readme(data["records"], data["environment"]))
        return

    for _, _, ckpt, _ in MODELS:
        if not (REPO / ckpt / "manifest.json").is_file():
            raise SystemExit(f"checkpoint folder not found: {REPO / ckpt} (no manifest.json)")
    started = time.perf_counter()
    records = []
    batches = {"default-17m": args.batches_17m, "54m-trained": args.batches_54m}
    for name, _, ckpt, sub in MODELS:
        print(name, flush=True)
        targets = [("portable", SCHEMES)]
        if not args.no_ort_cpu:
            targets.append(("ort-cpu", [s for s in SCHEMES if s[0] in ORT_CPU_SCHEMES]))
        for target, schemes in targets:
            work = args.work / (sub if target == "portable" else f"{sub}-{target}")
            perseus("export", ckpt, "-o", str(work / "fp32"), "--target", target, "--force")
            records += run_model(name, work / "fp32", work, batches[name], args, schemes, target)
    elapsed = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args, elapsed)
    (args.out / "quality.json").write_text(json.dumps({"environment": env, "records": records}, indent=2) + "\n")
    plot(records, args.out / "size_vs_ppl.png")
    (args.out / "README.md").write_text(readme(records, env))
    print(f"wrote {args.out} in {elapsed / 60:.1f} min")


def environment(args, elapsed: float) -> dict:
    import onnx
    import onnxruntime

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "python": platform.python_version(),
            "cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "load_average_at_end": load,
            "decode_tokens": args.decode_tokens, "rounds": args.rounds, "minutes": round(elapsed / 60, 1),
            "batches_17m": args.batches_17m, "batches_54m": args.batches_54m, "data": _shown(data_dir()),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def _shown(path: Path) -> str:
    """A path as the report prints it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- outputs
def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (model, short, ckpt, _) in zip(axes, MODELS):
        rows = [r for r in records if r["model"] == model]
        xs, ys = [r["size_bytes"] / 2**20 for r in rows], [r["ppl_delta_pct"] for r in rows] + [0, max(GOALS.values())]
        dx, dy = 0.05 * (max(xs) - min(xs)), 0.05 * (max(ys) - min(ys))  # "nearly": 5% of the axis
        groups: dict = {}  # points that (nearly) coincide share one label, one line per scheme
        for target, marker in (("portable", "o"), ("ort-cpu", "s")):
            sel = [r for r in rows if r["export_target"] == target]
            if not sel:
                continue
            ax.scatter([r["size_bytes"] / 2**20 for r in sel], [r["ppl_delta_pct"] for r in sel], marker=marker,
                       label=f"{target} export", alpha=0.8)
            for r in sel:
                x, y = r["size_bytes"] / 2**20, r["ppl_delta_pct"]
                key = next((k for k in groups if abs(k[0] - x) < dx and abs(k[1] - y) < dy), (x, y))
                groups.setdefault(key, []).append(r["scheme"] + (" (ort-cpu)" if target == "ort-cpu" else ""))
        for (x, y), labels in groups.items():
            ax.annotate("\n".join(labels), (x, y), fontsize=7, xytext=(6, 0), textcoords="offset points",
                        va="center")
        ax.axhline(0, color="grey", lw=0.5)
        for g, v in GOALS.items():
            ax.axhline(v, color="red", lw=0.6, ls="--")
            ax.text(1.0, v, f"{g} goal +{v:g}% ", color="red", fontsize=7, ha="right", va="bottom",
                    transform=ax.get_yaxis_transform())
        base = next(r for r in rows if r["scheme"] == "fp32")
        ax.set_title(f"{short} model, trained ({ckpt})\nfp32 perplexity {base['ppl']:.2f} on {base['tokens']:,} "
                     "test tokens", fontsize=9)
        ax.set_xlabel("model folder size (MiB)")
        ax.set_ylabel("perplexity change vs fp32 (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: list[dict]) -> str:
    head = ("| scheme | export | ppl (test) | Δppl | size MiB | × fp32 | cache MiB @ctx | decode tok/s (runs) "
            "| × fp32 | prompt tok/s | peak RSS MiB | anon RSS MiB |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['export_target']} | {r['ppl']:.3f} | {_pct(r['ppl_delta_pct'])} "
                     f"| {_mib(r['size_bytes'])} | {r['size_ratio']:.2f} | {_mib(r['cache_bytes'])} | {r['decode_tok_s']:.0f} "
                     f"({', '.join(f'{x:.0f}' for x in r['decode_tok_s_runs'])}) | {r['speedup']:.2f} "
                     f"| {r['prompt_tok_s']:.0f} | {_mib(r['peak_rss_bytes'])} | {_mib(r['anon_rss_bytes'])} |")
    return head + "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return f"{round(x, 2) + 0.0:+.2f}%"  # no "-0.00%"


def model_section(name: str, short: str, ckpt: str, records: list[dict]) -> str:
    """One model's table, its goal verdicts (portable export) and the int8 cache line."""
    rows = [r for r in records if r["model"] == name]
    p = {r["scheme"]: r for r in rows if r["export_target"] == "portable"}
    o = {r["scheme"]: r for r in rows if r["export_target"] == "ort-cpu"}
    lines = []
    for scheme, goal in GOALS.items():
        delta = p[scheme]["ppl_delta_pct"]
        verdict = "met" if delta <= goal else f"MISSED by {delta - goal:.2f} points ({CLOSE[scheme]})"
        other = f" (ort-cpu export: {_pct(o[scheme]['ppl_delta_pct'])})" if scheme in o else ""
        lines.append(f"- **{scheme}**: {_pct(delta)} perplexity (goal ≤ +{goal:g}%): {verdict}.{other}")
    cache_int4 = 100 * (p["int4+kv8"]["ppl"] / p["int4"]["ppl"] - 1)
    lines.append(f"- **int8 cache** (`--kv-cache int8`): cache {p['fp32']['cache_bytes'] / p['fp32+kv8']['cache_bytes']:.2f}× "
                 f"smaller ({_mib(p['fp32']['cache_bytes'])} → {_mib(p['fp32+kv8']['cache_bytes'])} MiB at the full "
                 f"1024-token context), perplexity {_pct(p['fp32+kv8']['ppl_delta_pct'])} alone, {_pct(cache_int4)} "
                 "on top of int4.")
    return (f"## {short} model (trained, `{ckpt}`)\n\nfp32 perplexity {p['fp32']['ppl']:.2f} on {p['fp32']['tokens']:,} test tokens.\n\n"
            f"{table(rows)}\nGoals (portable export; the ort-cpu rows, what `perseus export` writes by default, are in parentheses):\n\n" + "\n".join(lines) + "\n")


def readme(records: list[dict], env: dict) -> str:
    by = {name: {r["scheme"]: r for r in records if r["model"] == name and r["export_target"] == "portable"}
          for name, *_ in MODELS}
    dp, mp = by["default-17m"], by["54m-trained"]
    tokens17, tokens54 = dp["fp32"]["tokens"], mp["fp32"]["tokens"]
    q = dp["int4"]["quantization"] or {}
    qmoe = {(short, r["scheme"]): (r.get("lowering") or {}).get("qmoe") or {} for name, short, *_ in MODELS
            for r in records if r["model"] == name and r["export_target"] == "ort-cpu" and r["scheme"] in ("int8", "int4")}
    qmoe_note = ("; ".join(f"{short} {scheme}: {qm.get('bits')}-bit blocks of {qm.get('block_size')}, expert width "
                           f"zero-padded from {qm.get('expert_width')} to {qm.get('padded_width')}"
                           for (short, scheme), qm in qmoe.items())
                 + ": the kernel's blocking needs whole blocks") if qmoe else "no ort-cpu rows in this run"
    sections = "\n".join(model_section(name, short, ckpt, records) for name, short, ckpt, _ in MODELS)
    return f"""# Quantization report

Produced by `python studies/quantization_report.py` ({env['minutes']} min, {env['date']}); raw numbers in
`quality.json`, plot `size_vs_ppl.png`. Machine: {env['cpu']}, {env['cores']} cores shared with other
jobs (load average at the end {', '.join(f'{x:.1f}' for x in env['load_average_at_end'] or [])}),
onnxruntime {env['onnxruntime']} CPU EP, {env['threads']} threads. Design and routes: `quantize/README.md`.
Both models are trained checkpoints, so every Δppl below is a quality number. Both saw 104.9M
tokens (the 17M ~6 per parameter, the 54M ~2; models/README.md, studies/results/training/), and
both lose more to int4 ({_pct(dp['int4']['ppl_delta_pct'])} and {_pct(mp['int4']['ppl_delta_pct'])}) than they did after
3.6M / 5.7M tokens (+1.1% / +0.67%): a longer-trained model has less slack for rounding.

* **Perplexity**: `perseus eval DIR --split test --json --max-batches N` (held-out books; windows of 256
  tokens, batches of 8): **{tokens17:,} tokens** for the 17M model ({env['batches_17m']} batches), **{tokens54:,}**
  for the 54M model ({env['batches_54m']} batches), the first N batches of the test split, not all of it
  (the whole split is 354,304 tokens; models/README.md gives the 54M's perplexity over all of it). The
  same tokens for every scheme, so the deltas are paired.
* **Decode tok/s**: greedy, {env['decode_tokens']} tokens after a one-sentence prompt, fresh process per folder,
  median of {env['rounds']} round-robin rounds (all runs listed). The machine is shared and its load
  changed during the run: compare schemes within one table block (measured round-robin), not across
  models or blocks; differences under ~15% are noise.
* **Peak RSS**: the generating process's high-water mark (Python + onnxruntime + tokenizers ≈ 100+ MiB of
  it); anon RSS = anonymous resident memory at the end (weights mapped from model.onnx.data are not in it).
* **Size**: the whole model folder (graph, weights, tokenizer 0.5 MiB, configs).

{sections}
## Speed, memory, schemes

Speed and memory (portable, medians above): decode ×{dp['int8']['speedup']:.2f} for int8 and
×{dp['int4']['speedup']:.2f} for int4 on the 17M model (×{mp['int8']['speedup']:.2f} / ×{mp['int4']['speedup']:.2f} on the 54M
one, whose portable MoE body multiplies by every expert: a decode step reads nearly all of its
{_mib(mp['fp32']['weights_bytes'])} MiB of fp32 weights); peak RSS
{_mib(dp['fp32']['peak_rss_bytes'])} → {_mib(dp['int8']['peak_rss_bytes'])} / {_mib(dp['int4']['peak_rss_bytes'])} MiB (54M: {_mib(mp['fp32']['peak_rss_bytes'])} → {_mib(mp['int8']['peak_rss_bytes'])} / {_mib(mp['int4']['peak_rss_bytes'])} MiB).
The int8 cache (c_kv and k_rope as int8 rows + one float32 scale per token) shows no cost beyond noise
at this short context; at ~900 tokens of context it costs ~0.5 ms/token (every step dequantizes the
valid rows; quantize/README.md, "int8 cache").

int4 = `{q.get('weights', {}).get('op')}` blocks of {q.get('block_size')} ({q.get('method')}, 4-bit zero points,
accuracy_level {q.get('accuracy_level')}) for every projection, the experts inside `perseus.MoE`, the LM head,
and the embedding table (`GatherBlockQuantized`); MLA's W_UK / W_UV stored int8. int8 = dynamic int8
(uint8 activations per tensor, int8 weights per channel) everywhere, embedding table int8 per row.
fp16 = fp16 weight storage, cast to fp32 at load (onnxruntime folds the casts, so it computes and
decodes like fp32; its peak RSS is higher because the folded fp32 weights are anonymous memory).
A true fp16-compute graph did not load on the CPU EP: onnxconverter-common's
`convert_float_to_float16` leaves the perseus function bodies in fp32 (type mismatch at load), and
after inlining the functions some fp32 constants remain (`Mul` bound to float16 and float).

`ort-cpu` rows: the exporter's lowering of the MoE to `com.microsoft.MoE`; quantized, the experts go to
`com.microsoft.QMoE` ({qmoe_note}).

## Commands

```bash
perseus export perseus_edge/assets/default -o $W/default/fp32 --target portable --force
perseus quantize $W/default/fp32 -o $W/default/fp16 --scheme fp16
perseus quantize $W/default/fp32 -o $W/default/int8 --scheme int8
perseus quantize $W/default/fp32 -o $W/default/int4 --scheme int4
perseus quantize $W/default/fp32 -o $W/default/int4-kv8 --scheme int4 --kv-cache int8
perseus quantize $W/default/fp32 -o $W/default/fp32-kv8 --scheme fp32 --kv-cache int8
perseus eval $W/default/int4 --split test --json --max-batches {env['batches_17m']} --threads {env['threads']} --data-dir $DATA
python studies/quantization_report.py --decode $W/default/int4 --threads {env['threads']} --decode-tokens {env['decode_tokens']}
# ort-cpu rows: perseus export ... --target ort-cpu, then the fp32 / int8 / int4 commands
# 54M: the same with models/perseus-54m-moe-mla-rope and --max-batches {env['batches_54m']}
```

`--target` is `auto` (here: avx512_vnni); `$DATA` is a folder holding `test.txt.xz`
(here `{env.get('data', '?')}`, which `perseus eval` also finds without `--data-dir`).
"""

if __name__ == "__main__":
    main()
