"""One model at one thread count in a process of its own, driven over a pipe by `perseus bench`.

    python -m perseus_edge.bench.worker      # reads JSON requests on stdin, answers JSON lines

Each worker has its own address space, so its peak RSS is that engine's with that model (the
Python interpreter included, for both engines alike).

Requests (one JSON object per line) and answers:
    {"path": ..., "threads": 2, "prompt": [ids], "depth": 900}   first line: load the model and fill
        its cache with prompt[:depth] (untimed)
        -> {"ready": true, "backend", "version", "size_bytes", "params", "max_context", "load_s"}
    {"cmd": "pp", "n": 256, "depth": 0}   -> {"tok_s"}  one batch prompt[depth:depth+n] at
        positions depth.. (in the runtime's prefill chunks): tok/s = n / time
    {"cmd": "tg", "n": 128, "depth": 900} -> {"tok_s"}  n one-token steps over prompt[depth:depth+n]
    {"cmd": "stats"}                      -> {"peak_rss_bytes", "rss_bytes"}
Failures answer {"error": "..."}; end of input ends the worker.

Generation is teacher-forced: every step feeds the prompt's next token, as llama-bench feeds
tokens it does not sample. Both engines thus read the same ids, and every test writes the same
tokens at the same positions, so the cache rows below any depth always hold prompt[:depth]:
the ONNX cache never needs restoring; llama.cpp's cache drops its cells past the depth and
refills the prefix when a shallower test removed it (untimed).

Backends, chosen by what the path is:
  onnxruntime  a model folder: `perseus_edge.runtime.Model.forward` (in-place IO binding)
  llama.cpp    a .gguf file: llama-cpp-python's low-level API (`llama_decode`), `llama.py`
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, path: str, threads: int, prompt: np.ndarray):
        import onnxruntime

        from perseus_edge.runtime.model import Model

        self.model = Model(path, threads=threads, verify=False)
        # "+ perseus kernels": the native perseus ops ran (runtime.kernels), else their bodies
        self.version = onnxruntime.__version__ + (" + perseus kernels" if self.model.native_kernels else "")
        self.max_context = self.model.max_context
        graph = self.model.folder.graph
        self.size_bytes = sum(p.stat().st_size for p in graph.parent.glob(graph.name + "*"))
        self.params = self.model.config.param_counts()["total"]
        self.n_vocab = self.model.config.vocab_size
        self.ids = prompt[None, :]
        self.chunk = self.model.prefill_chunk  # prompt tokens per call, as `perseus run` feeds them

    def reset(self, depth: int) -> None:
        """Nothing to do: rows past `depth` are masked by the graph and rewritten by the test."""

    def forward(self, start: int, stop: int) -> None:
        """prompt[start:stop] at positions start..; the graph writes their cache rows in place."""
        self.model.forward(self.ids[:, start:stop], start, last_only=True)


class Worker:
    def __init__(self, spec: dict):
        self.prompt = np.asarray(spec["prompt"], dtype=np.int64)
        path, threads, depth = spec["path"], int(spec["threads"]), int(spec.get("depth", 0))
        t0 = time.perf_counter()
        if Path(path).is_file():
            from perseus_edge.bench.llama import LlamaCppBackend

            self.backend = LlamaCppBackend(path, threads, n_ctx=len(self.prompt), prompt=self.prompt)
        else:
            self.backend = OnnxBackend(path, threads, self.prompt)
        if len(self.prompt) and int(self.prompt.max()) >= self.backend.n_vocab:
            raise ValueError(f"prompt token {int(self.prompt.max())} is outside the model's vocabulary "
                             f"of {self.backend.n_vocab}")
        if depth:
            self.backend.reset(0)
            self.run(0, depth)
        self.load_s = time.perf_counter() - t0

    def run(self, start: int, n: int, step: int | None = None) -> float:
        """prompt[start:start+n] through the model, `step` tokens per call (default: the backend's
        own prompt chunk); seconds taken."""
        forward, stop, step = self.backend.forward, start + n, step or self.backend.chunk
        t0 = time.perf_counter()
        for s in range(start, stop, step):
            forward(s, min(s + step, stop))
        return time.perf_counter() - t0

    def test(self, kind: str, n: int, depth: int) -> float:
        if depth + n > min(len(self.prompt), self.backend.max_context):
            raise ValueError(f"{kind}{n} at depth {depth} needs {depth + n} positions; the model holds "
                             f"{self.backend.max_context}")
        self.backend.reset(depth)
        return n / self.run(depth, n, None if kind == "pp" else 1)

    def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd in ("pp", "tg"):
            return {"tok_s": self.test(cmd, int(req["n"]), int(req.get("depth", 0)))}
        if cmd == "stats":
            from perseus_edge.runtime.timings import proc_status_bytes

            status = proc_status_bytes("VmHWM", "VmRSS")
            return {"peak_rss_bytes": status.get("VmHWM", 0), "rss_bytes": status.get("VmRSS", 0)}
        raise ValueError(f"unknown request {req!r}")

    def ready(self) -> dict:
        b = self.backend
        return {"ready": True, "backend": b.name, "version": b.version, "size_bytes": int(b.size_bytes),
                "params": int(b.params), "max_context": int(b.max_context), "load_s": self.load_s}


def serve(stdin=None, out=None, make=None) -> None:
    """The worker side of the bench's line protocol: the first line is the worker's spec, answered
    by `ready()`; each later line is a request, answered by `handle(request)`; a failure comes back
    as {"error": its first line}. `make` builds the worker from the spec (default `Worker`; the
    CPU study in studies/cpu runs its own workers through this loop)."""
    stdin = stdin or sys.stdin
    make = make or Worker
    if out is None:  # answers on a private copy of stdout; library chatter goes to stderr
        out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)

    def answer(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    line = stdin.readline()
    if not line:
        return
    try:
        worker = make(json.loads(line))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which names the model
        answer({"error": _message(e)})
        return
    answer(worker.ready())
    for line in stdin:
        if not line.strip():
            continue
        try:
            answer(worker.handle(json.loads(line)))
        except Exception as e:  # noqa: BLE001
            answer({"error": _message(e)})


def _message(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


if __name__ == "__main__":
    serve()
