"""`perseus bench` output: llama-bench's markdown table, JSON or CSV of the records `rounds.py` makes.

Markdown columns are llama-bench's (model, size, params, backend, threads, test, t/s as mean ±
standard deviation) plus the worker's peak RSS; JSON and CSV hold every field (CSV joins the
per-repetition samples with ';').
"""

from __future__ import annotations

import csv
import io
import json

FIELDS = ("model", "path", "backend", "version", "size_bytes", "params", "threads", "test", "n_prompt",
          "n_gen", "n_depth", "avg_ts", "stddev_ts", "samples_ts", "peak_rss_bytes")
FORMATS = ("md", "json", "csv")


def size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def params_text(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def markdown(records: list[dict]) -> str:
    head = ("model", "size", "params", "backend", "threads", "test", "t/s", "peak RSS")
    rows = [(r["model"], size_text(r["size_bytes"]), params_text(r["params"]), r["backend"], str(r["threads"]),
             r["test"], f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}", size_text(r["peak_rss_bytes"]))
            for r in records]
    width = [max(len(c) for c in col) for col in zip(head, *rows)]
    right = {1, 2, 4, 6, 7}  # numbers align right, as llama-bench does

    def line(cells) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, width))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(width)) + "|"
    return "\n".join([line(head), rule] + [line(r) for r in rows]) + "\n"


def to_json(records: list[dict]) -> str:
    return json.dumps([{k: r[k] for k in FIELDS} for r in records], indent=2) + "\n"


def to_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    for r in records:
        writer.writerow([";".join(f"{x:.6g}" for x in r[k]) if k == "samples_ts" else r[k] for k in FIELDS])
    return buf.getvalue()


def render(records: list[dict], fmt: str) -> str:
    return {"md": markdown, "json": to_json, "csv": to_csv}[fmt](records)
