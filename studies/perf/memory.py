"""Peak RSS of a model folder under session settings, each in a fresh process.

    python studies/perf/memory.py /tmp/perf/54m-int8 --prefill 256 --decode 128

For each setting: a new interpreter imports the runtime, loads the folder with
`perseus_edge.runtime.Model` (the path `perseus run` takes), prefills `prefill` tokens and decodes
`decode` more; it reports RSS (total / anonymous / file-backed, MiB) after import, after the
session is created, and the peak (VmHWM) at the end, plus the decode tok/s (noisy on a shared
machine; for orientation only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SETTINGS = {
    "default": {},
    "no prepacking": {"config": {"session.disable_prepacking": "1"}},
    "low_memory": {"low_memory": True},
    "low_memory, prepacking on": {"low_memory": True, "config": {"session.disable_prepacking": "0"}},
}

CHILD = r"""
import json, sys, time
import numpy as np
from perseus_edge.runtime.timings import proc_status_bytes
def rss():
    s = proc_status_bytes("VmRSS", "RssAnon", "RssFile", "VmHWM")
    return {k: round(s.get(f, 0) / 2**20, 1) for k, f in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"), ("peak", "VmHWM"))}
folder, setting, prefill, decode = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from perseus_edge.runtime.model import Model
out = {"import": rss()}
m = Model(folder, threads=1, verify=False, low_memory=setting.get("low_memory", False),
          session_config=setting.get("config"))
out["session"] = rss()
ids = (np.arange(prefill) * 7919 % m.spec.vocab_size)[None]
for s in range(0, prefill, m.prefill_chunk):  # the runtime's prompt chunk, as `perseus run`
    logits = m.forward(ids[:, s:s + m.prefill_chunk], s, last_only=True)
token = np.array([[int(logits[0, -1].argmax())]])
t0 = time.perf_counter()
for i in range(decode):
    token[0, 0] = int(m.forward(token, prefill + i)[0, -1].argmax())
out["tok_s"] = round(decode / (time.perf_counter() - t0), 1)
out["end"] = rss()
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=128)
    args = ap.parse_args()
    print("| folder | setting | RSS after import | session created (anon / file) | peak | decode tok/s |")
    print("|---|---|---:|---:|---:|---:|")
    for folder in args.folders:
        for name, setting in SETTINGS.items():
            res = subprocess.run([sys.executable, "-c", CHILD, folder, json.dumps(setting), str(args.prefill),
                                  str(args.decode)], capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            s = r["session"]
            print(f"| {folder} | {name} | {r['import']['rss']} | {s['rss']} ({s['anon']} / {s['file']}) "
                  f"| {r['end']['peak']} | {r['tok_s']} |", flush=True)


if __name__ == "__main__":
    main()
