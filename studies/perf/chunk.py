"""Prefill chunk size: peak RSS and prompt speed, each chunk size in a fresh process.

    python studies/perf/chunk.py /tmp/p2/sbs/54m-int8 /tmp/p2/sbs/54m-fp32 --chunks 256 64 --threads 1

Each child loads the folder with `perseus_edge.runtime.Model` (as `perseus run` does), fills the
cache with 768 tokens in chunks, times 256 more tokens at depth 768 and 256 tokens at depth 0 in
the same chunks, and reports the peak RSS (VmHWM, MiB): the shape of `perseus bench -p 256 -d 0,768`.
Run the list twice (`--repeat 2`) on a shared machine: the first call with a new shape is slower.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
from perseus_edge.runtime.model import Model
from perseus_edge.runtime.timings import proc_status_bytes
folder, chunk, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = Model(folder, threads=threads, verify=False)
ids = (np.arange(1024) * 7919 % m.spec.vocab_size)[None]
def run(start, stop):
    t0 = time.perf_counter()
    for s in range(start, stop, chunk):
        m.forward(ids[:, s:min(s + chunk, stop)], s, last_only=True)
    return time.perf_counter() - t0
run(0, 768)
deep = 256 / run(768, 1024)
shallow = 256 / run(0, 256)
print(json.dumps({"pp256@768": round(deep), "pp256@0": round(shallow),
                  "peak_mib": round(proc_status_bytes("VmHWM")["VmHWM"] / 2**20, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--chunks", nargs="+", type=int, default=[512, 256, 128, 64, 32])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    print(f"threads {args.threads}")
    print("| folder | chunk | pp256 @ 768 tok/s | pp256 @ 0 tok/s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for folder in args.folders:
        for chunk in args.chunks * args.repeat:
            out = subprocess.run([sys.executable, "-c", CHILD, folder, str(chunk), str(args.threads)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {folder} | {chunk} | {r['pp256@768']} | {r['pp256@0']} | {r['peak_mib']} |", flush=True)


if __name__ == "__main__":
    main()
