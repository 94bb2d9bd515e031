"""A/B decode timing of two builds of the native kernel library on one model folder.

    PYTHONPATH=$PWD python studies/perf/ab_lib.py /tmp/sbs4/54m-fp32 /tmp/libA.so /tmp/libB.so --rounds 9

Both libraries are loaded into one process, each registered with its own session of the folder
(`perseus_edge.runtime.Model`, 1 thread), so the machine's noise hits both alike: every round
times `--steps` one-token steps after a `--context`-token prompt on each (order alternating),
keeping the best of 3; prints the median step times and the median per-round ratio A/B (> 1: B
is faster) with its range. Copy a build's
`perseus_edge/runtime/kernels/_perseus_kernels*.so` aside before rebuilding to compare.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from perseus_edge.runtime import kernels
from perseus_edge.runtime.model import Model


def interleaved(models: list, rounds: int, context: int, steps: int) -> list[list[float]]:
    """Per model, per round: the best of 3 timings of `steps` one-token steps after a
    `context`-token prompt, the models' order alternating from round to round."""
    prompt = np.random.default_rng(0).integers(2, 4000, (1, context))
    for m in models:
        m.forward(prompt, 0, last_only=True)
    token = np.array([[5]])
    times: list[list[float]] = [[] for _ in models]
    for r in range(rounds):
        for i in range(len(models)) if r % 2 == 0 else reversed(range(len(models))):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for s in range(steps):
                    models[i].forward(token, context + s, last_only=True)
                best = min(best, (time.perf_counter() - t) / steps)
            times[i].append(best)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("library_a")
    ap.add_argument("library_b")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--steps", type=int, default=48)
    args = ap.parse_args()
    models = []
    for lib in (args.library_a, args.library_b):
        kernels.library = lambda lib=lib: Path(lib)  # what runtime.session registers
        models.append(Model(args.folder, threads=1))
    times = interleaved(models, args.rounds, args.context, args.steps)
    ratios = [a / b for a, b in zip(*times)]
    print(f"{Path(args.folder).name} context {args.context}: A {statistics.median(times[0]) * 1e3:.3f} ms, "
          f"B {statistics.median(times[1]) * 1e3:.3f} ms, A/B {statistics.median(ratios):.3f} "
          f"[{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
