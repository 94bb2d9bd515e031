"""Is 1.5x llama.cpp reachable at fp32? A decode step's memory bound against both engines.

    PYTHONPATH=$PWD python studies/llama_cpp/fp32_bound.py --work /tmp/sbs2 --bench studies/results/llama_cpp/bench.json

For each model's fp32 folder: the bytes one decode step reads (`perseus_edge.bench.graphinfo.
decode_cost`: every weight it multiplies by once, the selected experts only, one embedding row,
the cache at the benchmark's 128 tokens), this machine's read bandwidth at 1 and 2 threads (the
best of 5 passes over 512 MiB of float32, each thread summing its slice with one BLAS dot; the
array is 16x the L3), and the bound bytes / bandwidth in tok/s, beside the tg128 both engines
reached in a `side_by_side.py` run (median of its repetitions). llama.cpp's f32 GGUF holds the
same weights in the same 4 bytes each and its MoE reads only the selected experts too, so both
engines share the bound: where llama.cpp already runs at more than 2/3 of it, 1.5x llama.cpp is
above what the memory can deliver, whatever the kernels do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread per Python thread below

import numpy as np  # noqa: E402

from studies.cpu.roofline import best_seconds  # noqa: E402


def read_gbs(threads: int, mib: int = 512, runs: int = 5) -> float:
    """Best GB/s of reading `mib` MiB of float32 split over `threads` threads (a dot per slice)."""
    data = np.ones(mib * 2 ** 20 // 4, np.float32)
    ones = np.ones_like(data)
    n = data.size

    def part(i: int) -> None:
        lo, hi = i * n // threads, (i + 1) * n // threads
        float(np.dot(data[lo:hi], ones[lo:hi]))  # BLAS releases the GIL

    return 2 * data.nbytes / best_seconds(part, threads, runs) / 1e9  # both operands are read


def main() -> None:
    from perseus_edge.bench.graphinfo import decode_cost

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/perseus-vs-llama"), help="side_by_side.py's --work")
    ap.add_argument("--bench", type=Path, required=True, help="bench.json of a side_by_side.py run")
    args = ap.parse_args()
    records = json.loads(args.bench.read_text())
    tg = {(Path(r["path"]).name, r["threads"]): statistics.median(r["samples_ts"])
          for r in records if r["test"] == "tg128"}
    bandwidth = {t: read_gbs(t) for t in (1, 2)}
    print("| model | threads | bytes / token | read GB/s | bound tok/s | llama.cpp f32 | of bound | "
          "1.5x llama.cpp | perseus fp32 | of bound |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("17m", "54m"):
        cost = decode_cost(args.work / f"{name}-fp32", context=128)
        for t, gbs in bandwidth.items():
            bound = gbs * 1e9 / cost["bytes"]
            theirs, ours = tg[(f"{name}-f32.gguf", t)], tg[(f"{name}-fp32", t)]
            print(f"| {name} | {t} | {cost['bytes'] / 1e6:.1f} MB | {gbs:.1f} | {bound:.0f} | {theirs:.0f} | "
                  f"{theirs / bound:.0%} | {1.5 * theirs:.0f} | {ours:.0f} | {ours / bound:.0%} |")


if __name__ == "__main__":
    main()
