"""A/B prompt speed of model folders, interleaved in one process.

    python studies/perf/prefill.py old=/tmp/p2/sbs2/17m-fp32 new=/tmp/r/17m-fp32 --threads 1

Each folder is loaded as a `perseus_edge.runtime.Model`; every round times pp256 (256 prompt
tokens from position 0, in the folder's own prompt chunk, `last_only` as a generation asks: the
best of 3 runs) for each folder in turn. Prints the median tok/s over rounds and the ratio to
the first folder. Used for `logits_rows` (perf README, section 8): folders exported before it
compute logits for every prompt row, after it for the last row only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    from studies.perf import variants

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="NAME=FOLDER (FOLDER@body: native kernels off)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--depth", type=int, default=0, help="cached tokens before the timed prompt")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    models = {name: variants.load(path, args.threads) for name, path in (f.split("=", 1) for f in args.folders)}

    def run(m, start: int, stop: int) -> None:
        ids = (np.arange(stop) * 7919 % m.spec.vocab_size)[None]
        for s in range(start, stop, m.prefill_chunk):
            m.forward(ids[:, s:min(stop, s + m.prefill_chunk)], s, last_only=True)

    def pp(m) -> float:  # the rows past the depth are rewritten by every run
        t0 = time.perf_counter()
        run(m, args.depth, args.depth + args.tokens)
        return time.perf_counter() - t0

    for m in models.values():
        run(m, 0, args.depth)

    times: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        pp(m)  # warm-up: first calls with a new shape are slower
    for _ in range(args.rounds):
        for name, m in models.items():
            times[name].append(min(pp(m) for _ in range(3)))
    first = next(iter(times))
    print(f"| folder | pp{args.tokens} @ {args.depth} tok/s ({args.threads} thread(s)) | vs {first} |\n|---|---:|---:|")
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(times[first], t))
        print(f"| {name} | {args.tokens / statistics.median(t):.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
