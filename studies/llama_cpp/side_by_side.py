"""perseus vs llama.cpp on the same weights: prepare both, time both in ONE `perseus bench` call.

    python studies/llama_cpp/side_by_side.py [--work /tmp/perseus-vs-llama] [--out DIR] [-r 3]

For each checkpoint (the shipped 17m, the trained 54M in models/):
  perseus    what a user gets by default: `perseus export` (fp32, lowered for ort-cpu), then
             `perseus quantize --scheme int8 | int4` of that folder (for ort-cpu)
  llama.cpp  `perseus export --format gguf --outtype f32 | q8_0 | q4_0`
then one `perseus bench` over all twelve files/folders (interleaved rounds, 1 and 2 threads,
pp256, tg128, at depth 0 and --depth), raw records to OUT/bench.json, and the side-by-side
table (perseus / llama.cpp at equal bit width: fp32/f32, int8/q8_0, int4/q4_0) to
OUT/table.md and stdout. Prepared files are reused when present (delete --work to redo them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = {"17m": ROOT / "perseus_edge" / "assets" / "default",
               "54m": ROOT / "models" / "perseus-54m-moe-mla-rope"}
PAIRS = (("fp32", "f32"), ("int8", "q8_0"), ("int4", "q4_0"))


def perseus(*args: str) -> str:
    cmd = [sys.executable, "-m", "perseus_edge.cli", *args]
    print("$ perseus " + " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT).stdout


def prepare(work: Path) -> dict[tuple[str, str], Path]:
    """(model, variant) -> folder or .gguf file."""
    paths = {}
    for name, ckpt in CHECKPOINTS.items():
        fp32 = work / f"{name}-fp32"
        if not fp32.is_dir():
            perseus("export", str(ckpt), "-o", str(fp32))
        paths[(name, "fp32")] = fp32
        for scheme in ("int8", "int4"):
            folder = work / f"{name}-{scheme}"
            if not folder.is_dir():
                perseus("quantize", str(fp32), "-o", str(folder), "--scheme", scheme)
            paths[(name, scheme)] = folder
        for outtype in ("f32", "q8_0", "q4_0"):
            file = work / f"{name}-{outtype}.gguf"
            if not file.is_file():
                perseus("export", str(ckpt), "--format", "gguf", "--outtype", outtype, "-o", str(file))
            paths[(name, outtype)] = file
    return paths


def table(records: list[dict], paths: dict, depth: int) -> str:
    by = {(r["path"], r["threads"], r["test"]): r for r in records}
    threads = sorted({r["threads"] for r in records})
    tests = [("tg128", "tg128"), (f"tg128 @ d{depth}", f"tg128 @ d{depth}"), ("pp256", "pp256")]
    head = ["model", "perseus / llama.cpp", "threads"]
    for label, _ in tests:
        head += [f"perseus {label}", f"llama.cpp {label}", "ratio"]
    head += ["perseus peak RSS", "llama.cpp peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (3 * len(tests) + 2)]
    for name in CHECKPOINTS:
        for ours, theirs in PAIRS:
            p, q = str(paths[(name, ours)]), str(paths[(name, theirs)])
            for t in threads:
                row = [name, f"{ours} / {theirs}", str(t)]
                for _, test in tests:
                    a, b = by[(p, t, test)], by[(q, t, test)]
                    row += [f"{a['avg_ts']:.0f} ± {a['stddev_ts']:.0f}", f"{b['avg_ts']:.0f} ± {b['stddev_ts']:.0f}",
                            f"{statistics.median(a['samples_ts']) / statistics.median(b['samples_ts']):.2f}"]
                row += [f"{by[(p, t, 'tg128')]['peak_rss_bytes'] / 2**20:.0f} MiB",
                        f"{by[(q, t, 'tg128')]['peak_rss_bytes'] / 2**20:.0f} MiB"]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/perseus-vs-llama"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/perseus-vs-llama/results"))
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--depth", type=int, default=768, help="cached tokens of the long-context tests "
                                                             "(pp256 at this depth must fit 1024 positions)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(a.work)
    args = ["bench"]
    for name in CHECKPOINTS:
        for pair in PAIRS:
            for variant in pair:
                args += ["-m", str(paths[(name, variant)])]
    args += ["-p", "256", "-n", "128", "-d", f"0,{a.depth}", "-t", "1,2", "-r", str(a.reps), "-o", "json"]
    records = json.loads(perseus(*args))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench.json").write_text(json.dumps(records, indent=1) + "\n")
    text = (f"Command: `perseus {' '.join(args)}` (via `python studies/llama_cpp/side_by_side.py`).\n"
            "Mean ± sd of the repetitions in t/s; ratio = perseus / llama.cpp of the medians.\n\n"
            + table(records, paths, a.depth))
    (a.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
