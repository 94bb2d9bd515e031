"""The native kernels' portable loops against the AVX-512 ones and the ops' bodies, on this CPU.

    python studies/perf/portable.py /tmp/sbs4/54m-int4 /tmp/sbs4/54m-fp32 --rounds 3

What a CPU without AVX-512 runs, imitated here with PERSEUS_KERNELS_GENERIC=1 (onnxruntime's own
kernels keep their AVX-512 paths, so the bodies are favoured): four variants, each in a fresh
process, alternating within every round. A process prefills 256 tokens (best of 3 runs after a
warm-up), then times 128 one-token steps after them (median step), and reports its peak RSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

RUN = """
import resource, statistics, sys, time
import numpy as np
from perseus_edge.runtime.model import Model
config = {"perseus.kernels": "moe"} if sys.argv[2] == "moe" else None
m = Model(sys.argv[1], threads=1, session_config=config)
prompt = np.random.default_rng(0).integers(2, 4000, (1, 256))
m.forward(prompt, 0, last_only=True)
pp = []
for _ in range(3):
    t = time.perf_counter(); m.forward(prompt, 0, last_only=True); pp.append(time.perf_counter() - t)
ts = []
for i in range(128):
    t = time.perf_counter(); m.forward(np.array([[5]]), 256 + i, last_only=True); ts.append(time.perf_counter() - t)
print(256 / min(pp), 1 / statistics.median(ts), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      m.native_kernels)
"""
# name, environment, "moe" = the session asks the library for SparseMoE alone
VARIANTS = (
    ("AVX-512 kernels", {}, ""),
    ("portable SparseMoE, attention body (a CPU without AVX-512)", {"PERSEUS_KERNELS_GENERIC": "1"}, "moe"),
    ("portable SparseMoE and LatentAttention", {"PERSEUS_KERNELS_GENERIC": "1"}, ""),
    ("bodies (no library)", {"PERSEUS_KERNELS": "0"}, ""),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print("| model | variant | pp256 tok/s | tg128 tok/s (after 256) | peak RSS MiB |")
    print("|---|---|---:|---:|---:|")
    for folder in args.folders:
        samples: dict[str, list[list[float]]] = {name: [] for name, *_ in VARIANTS}
        for _ in range(args.rounds):
            for name, env, only in VARIANTS:
                out = subprocess.run([sys.executable, "-c", RUN, folder, only], check=True, capture_output=True,
                                     text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1", **env}).stdout
                samples[name].append([float(v) for v in out.split()[:3]])
        for name, runs in samples.items():
            pp, tg, rss = (statistics.median(r[i] for r in runs) for i in range(3))
            print(f"| {Path(folder).name} | {name} | {pp:.0f} | {tg:.0f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
