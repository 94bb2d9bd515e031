"""Idle-thread spinning A/B: decode tok/s of one model folder, spinning off vs on, interleaved.

    python studies/perf/spin.py /tmp/perseus-vs-llama/54m-int8 --rounds 3

Each variant runs in its own fresh process (two sessions spinning in one process would disturb
each other), alternating within every round: 1 thread, 2 threads spin off, 2 threads spin on.
A process prefills 16 tokens, then times 128 one-token steps and prints the median step's tok/s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

STEP = """
import statistics, sys, time
import numpy as np
from perseus_edge.runtime.model import Model
m = Model(sys.argv[1], threads=int(sys.argv[2]), session_config={"session.intra_op.allow_spinning": sys.argv[3]})
m.forward(np.arange(16, dtype=np.int64)[None] % 200, 0)
ts = []
for i in range(128):
    t = time.perf_counter(); m.forward(np.array([[5]], np.int64), 16 + i); ts.append(time.perf_counter() - t)
print(1 / statistics.median(ts))
"""
VARIANTS = (("1 thread", "1", "0"), ("2 threads, spin off", "2", "0"), ("2 threads, spin on", "2", "1"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    samples: dict[str, list[float]] = {name: [] for name, *_ in VARIANTS}
    for _ in range(args.rounds):
        for name, threads, spin in VARIANTS:
            out = subprocess.run([sys.executable, "-c", STEP, args.folder, threads, spin],
                                 check=True, capture_output=True, text=True).stdout
            samples[name].append(float(out))
    base = statistics.median(samples[VARIANTS[0][0]])
    print("| variant | tok/s per round | median | vs 1 thread |\n|---|---|---:|---:|")
    for name, ts in samples.items():
        print(f"| {name} | {', '.join(f'{t:.0f}' for t in ts)} | {statistics.median(ts):.0f} | "
              f"{statistics.median(ts) / base:.2f}x |")


if __name__ == "__main__":
    main()
