"""Is 1.5x llama.cpp reachable at fp32? Both engines against the memory floor of a decode step, in one run.

    PYTHONPATH=$PWD python studies/llama_cpp/fp32_bound.py --work /tmp/sbs4 [--rounds 5] [--out DIR]

The floor: `step_reads.cc` (built here with g++) reads exactly the weights one decode step of the
fp32 folder multiplies by, in the graph's order, each from its own allocation, with new random
experts every step (so they come from DRAM, as in a generation), plus the cache at 64 rows (the
mean of a tg128): no arithmetic, no framework, nothing between the reads. It reads them twice
over, plainly and with the experts and the head streamed past the last-level cache (non-temporal
prefetches, so the rest may stay in it), and the faster of the two is the floor. Each round
times that floor at 1 and 2 threads (median step of 300), then `perseus bench -p 0 -n 128 -r 1` over the
f32 GGUF (llama.cpp) and the fp32 folder (perseus) at 1 and 2 threads, so all three see the
same machine state. llama.cpp's f32 GGUF holds the same weights in the same 4 bytes and its MoE
reads only the selected experts, so both engines share the floor: a decode step can't be faster
than reading its weights. Where 1.5x llama.cpp's tok/s is near or above the floor's, no engine
that reads these bytes gets there; the table says which share of the floor each engine reaches and
which one 1.5x llama.cpp needs (medians over rounds of the per-round ratios). Raw numbers:
OUT/fp32_bound.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from perseus_edge.bench.graphinfo import cache_layout, component, read_config
from perseus_edge.modelfile import names as mf

HERE = Path(__file__).resolve().parent
THREADS = (1, 2)
STEPS = 300


def plan(folder: Path, cache_rows: int = 64) -> list[str]:
    """step_reads' plan for an fp32 ort-cpu folder: its weights in first-use order (one row of the
    embedding and RoPE tables), each perseus.SparseMoE's experts as an expert layer, and after each
    attention node its layer's share of the cache at `cache_rows` rows."""
    model = onnx.load(str(folder / mf.MODEL_ONNX), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    cfg = read_config(folder)
    cache = cache_layout(folder, model)["bytes_per_token"] * cache_rows // cfg.num_hidden_layers
    seen, lines = set(), []

    def weight(nbytes: int) -> None:  # step_reads reads 256-byte granules: smaller ones are noise
        if nbytes >= 256:
            lines.append(f"w {nbytes}")

    for node in model.graph.node:
        weights = [name for name in node.input if name in inits and name not in seen]
        seen.update(weights)
        if node.op_type == mf.OP_SPARSE_MOE and node.domain == mf.PERSEUS_DOMAIN:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            fc1, fc2 = inits[node.input[3]], inits[node.input[4]]
            if fc1.data_type != onnx.TensorProto.FLOAT:
                raise SystemExit(f"{folder}: float experts expected (an fp32 folder)")
            experts = fc1.dims[0]
            weight(size(inits[node.input[1]]))  # router
            weight(size(inits[node.input[2]]))  # its bias
            lines.append(f"moe {size(fc1)} {size(fc2)} {experts} {experts - attrs.get('n_shared', 0)} {attrs['top_k']}")
            continue
        for name in weights:
            t = inits[name]
            rows = t.dims[0] if component(name) in ("embeddings", "rope tables") and t.dims else 1
            weight(size(t) // rows)
        if node.op_type == mf.OP_LATENT_ATTENTION and node.domain == mf.PERSEUS_DOMAIN:
            weight(cache)
    return lines


def size(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def floor_ms(binary: Path, plan_file: Path, threads: int, mode: str) -> tuple[float, int]:
    """(median step ms, bytes per step) of step_reads in `mode` ("plain" or "stream")."""
    out = subprocess.run([str(binary), str(plan_file), str(threads), str(STEPS), mode], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[3]), int(out[0])  # "<bytes> bytes, median <ms> ms, best <ms> ms"


def bench(paths: list[Path]) -> list[dict]:
    cmd = [sys.executable, "-m", "perseus_edge.cli", "bench", "-p", "0", "-n", "128", "-r", "1", "-o", "json",
           "-t", ",".join(map(str, THREADS))]
    for p in paths:
        cmd += ["-m", str(p)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/perseus-vs-llama"),
                    help="side_by_side.py's --work (NAME-fp32 folders and NAME-f32.gguf files)")
    ap.add_argument("--models", default="17m,54m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="folder for fp32_bound.json")
    args = ap.parse_args()
    started = datetime.now(timezone.utc)
    binary = args.work / "step_reads"
    subprocess.run(["g++", "-O3", "-march=native", "-pthread", "-o", str(binary), str(HERE / "step_reads.cc")], check=True)
    names = args.models.split(",")
    plans, sizes = {}, {}
    for name in names:
        plans[name] = args.work / f"{name}-fp32.plan"
        plans[name].write_text("\n".join(plan(args.work / f"{name}-fp32")) + "\n")
    rows = {(n, t): {"floor": [], "plain": [], "stream": [], "llama.cpp": [], "perseus": []}
            for n in names for t in THREADS}
    for r in range(args.rounds):
        for name in names:
            for t in THREADS:
                v = rows[(name, t)]
                for mode in ("plain", "stream"):
                    ms, sizes[name] = floor_ms(binary, plans[name], t, mode)
                    v[mode].append(1e3 / ms)
                v["floor"].append(max(v["plain"][-1], v["stream"][-1]))
            for rec in bench([args.work / f"{name}-f32.gguf", args.work / f"{name}-fp32"]):
                engine = "llama.cpp" if rec["backend"] == "llama.cpp" else "perseus"
                rows[(name, rec["threads"])][engine].append(rec["samples_ts"][0])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    med = statistics.median
    lines = ["| model | threads | bytes / step | floor tok/s | llama.cpp f32 | perseus fp32 | llama.cpp / floor | "
             "perseus / floor | 1.5x llama.cpp / floor | perseus / llama.cpp |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, t), v in rows.items():
        per = lambda a, b, k=1.0: med([k * x / y for x, y in zip(v[a], v[b])])  # noqa: E731 - per-round ratios
        lines.append(f"| {name} | {t} | {sizes[name] / 1e6:.1f} MB | {med(v['floor']):.0f} | {med(v['llama.cpp']):.0f} | "
                     f"{med(v['perseus']):.0f} | {per('llama.cpp', 'floor'):.0%} | {per('perseus', 'floor'):.0%} | "
                     f"{per('llama.cpp', 'floor', 1.5):.0%} | {per('perseus', 'llama.cpp'):.2f} |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        raw = [{"model": n, "threads": t, "bytes": sizes[n], **v} for (n, t), v in rows.items()]
        (args.out / "fp32_bound.json").write_text(json.dumps(raw, indent=1) + "\n")
        command = "PYTHONPATH=$PWD python studies/llama_cpp/fp32_bound.py " + " ".join(sys.argv[1:])
        (args.out / "fp32_bound.md").write_text(
            f"Command: `{command}` ({started:%Y-%m-%d %H:%M}-{datetime.now(timezone.utc):%H:%M} UTC). floor = a loop "
            "that only reads the step's weights (step_reads.cc), the faster of plain and streamed reads; ratios are "
            "medians of per-round ratios; raw: fp32_bound.json.\n\n" + "\n".join(lines) + "\n")

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
