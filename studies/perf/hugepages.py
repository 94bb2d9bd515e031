"""Do 2 MiB pages speed up a decode step? An experiment on Linux >= 6.1, not a runtime feature.

    PYTHONPATH=$PWD python studies/perf/hugepages.py /tmp/sbs4/54m-fp32 --rounds 9 [--file]

Two sessions of one folder in one process (`perseus_edge.runtime.Model`, 1 thread); every
mapping of 2 MiB or more that the second one added is collapsed to huge pages (MADV_COLLAPSE):
onnxruntime's heap (its packed weights). With --file its private mappings of model.onnx.data
(the weights our kernels read in place) are first replaced by anonymous copies at the same
addresses, which onnxruntime does not expect: for this measurement only. Then rounds of 48
one-token steps on each (`ab_lib.interleaved`); prints the median per-round ratio plain / huge.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics

import numpy as np

from perseus_edge.runtime.model import Model
from studies.perf.ab_lib import interleaved

MADV_HUGEPAGE, MADV_COLLAPSE, HUGE = 14, 25, 2 << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def mappings() -> dict[tuple[int, int], str]:
    out = {}
    for line in open("/proc/self/maps"):
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        out[(lo, hi)] = line.strip()
    return out


def collapse(lo: int, hi: int, line: str, files: bool) -> bool:
    """Collapse the 2 MiB-aligned interior of [lo, hi); with `files`, a weight-file mapping is
    replaced by an anonymous copy first (PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)."""
    lo, hi = (lo + HUGE - 1) // HUGE * HUGE, hi // HUGE * HUGE
    if hi <= lo or ("model.onnx.data" in line and not files):
        return False
    if "model.onnx.data" in line:
        copy = ctypes.create_string_buffer(hi - lo)
        ctypes.memmove(copy, lo, hi - lo)
        assert libc.mmap(lo, hi - lo, 3, 0x02 | 0x20 | 0x10, -1, 0) == lo
        libc.madvise(lo, hi - lo, MADV_HUGEPAGE)
        ctypes.memmove(lo, copy, hi - lo)
    libc.madvise(lo, hi - lo, MADV_HUGEPAGE)
    return libc.madvise(lo, hi - lo, MADV_COLLAPSE) == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--file", action="store_true", help="also remap the weight file's mappings")
    args = ap.parse_args()
    prompt = np.random.default_rng(0).integers(2, 4000, (1, 16))  # first runs: each session's buffers exist
    plain = Model(args.folder, threads=1)
    plain.forward(prompt, 0, last_only=True)
    before = mappings()
    huge = Model(args.folder, threads=1)
    huge.forward(prompt, 0, last_only=True)
    added = [(k, v) for k, v in mappings().items() if k not in before and k[1] - k[0] >= HUGE]
    done = sum((hi - lo) for (lo, hi), line in added if collapse(lo, hi, line, args.file))
    print(f"collapsed {done >> 20} MiB of the second session's mappings")
    times = interleaved([plain, huge], args.rounds, 16, 48)
    ratios = [a / b for a, b in zip(*times)]
    print(f"plain {statistics.median(times[0]) * 1e3:.3f} ms, huge {statistics.median(times[1]) * 1e3:.3f} ms, "
          f"plain/huge {statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
