"""One backend on one model with one thread count, in a process of its own, driven over a pipe.

    python -m studies.cpu.worker           # reads JSON requests on stdin, answers JSON lines

The harness (`harness.py`) starts one worker per (backend, model folder, threads) of a group and
then asks them in turn for one repetition of each test, round after round, so machine noise (the
benchmark machine is shared) hits every backend alike. Each worker has its own address space:
its peak RSS is that backend's, and torch never shares a process with the ONNX runtime (an onnx
worker does not import torch at all).

Requests (one JSON object per line) and answers:
    {"backend": "torch"|"onnx", "path": ..., "threads": 2, "prompt": [ids],
     "spin": null | 0 | 1}  (first line; spin overrides the runtime's intra-op spinning choice)
                                         -> {"ready": true, "load_s", "max_context", "cache_bytes"}
    {"cmd": "pp", "n": 64}               -> {"tok_s": ...}   one forward over n prompt tokens,
                                             empty cache: tok/s = n / time
    {"cmd": "tg", "n": 32, "context": 900} -> {"tok_s": ...} n greedy decode steps after the first
                                             `context` prompt tokens: tok/s = n / (sum of steps)
    {"cmd": "stats"}                     -> {"peak_rss_bytes", "rss", "anon", "file", "cache_bytes"}
Failures answer {"error": "..."}; end of input ends the worker.

Backends:
  onnx   `perseus_edge.runtime.Model.forward`: the runtime's in-place IO binding on the folder's
         graph (portable, ort-cpu or quantized) with `threads` intra-op threads
  torch  `PerseusLM.forward(ids, cache)` in eager mode on the CPU, `torch.set_num_threads(threads)`:
         the naive baseline, its latent (or K/V) cache grown by concatenation every step
         (OpenMP settings such as OMP_WAIT_POLICY come from the environment the harness sets)

The prefill before a tg test is done once per context and reused: the ONNX worker keeps a copy
of the prefilled cache rows and puts them back before each repetition (untimed), the torch
cache tensors are immutable (each step concatenates into new ones).
"""

from __future__ import annotations

import time

import numpy as np

from perseus_edge.bench.worker import serve


def rss_now() -> dict:
    """Resident set of this process: total, anonymous and file-backed bytes, and the high-water
    mark `peak` (Linux /proc; 0 elsewhere).

    The peak is VmHWM, the high-water mark of this process image's own memory map. Not
    getrusage's ru_maxrss: Linux carries that across fork + exec, so a worker started by a
    parent that had imported torch would report the parent's peak as its own.
    """
    from perseus_edge.runtime.timings import proc_status_bytes

    status = proc_status_bytes("VmRSS", "RssAnon", "RssFile", "VmHWM")
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    return {ours: status.get(field, 0) for field, ours in keys.items()}


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: str, threads: int, spin: int | None = None):
        from perseus_edge.runtime.model import Model

        # spin: threading-policy experiment, overriding the runtime's spinning choice
        config = None if spin is None else {"session.intra_op.allow_spinning": str(int(spin))}
        self.model = Model(path, threads=threads, verify=False, session_config=config)
        self.max_context = self.model.max_context
        self.cache_bytes = self.model.cache.nbytes

    def prefill(self, ids: np.ndarray):
        """ids [1, T] from position 0 in the runtime's 512-token chunks -> (last logits, state)."""
        for s in range(0, ids.shape[1], 512):
            logits = self.model.forward(ids[:, s:s + 512], s)
        rows = ids.shape[1]
        return logits[0, -1].copy(), [a[:, :rows].copy() for a in self.model.cache.arrays]

    def restore(self, state) -> None:
        """Put back the prefilled rows (another test may have overwritten them); not timed."""
        for a, saved in zip(self.model.cache.arrays, state):
            a[:, :saved.shape[1]] = saved

    def step(self, token: int, position: int, state):
        return self.model.forward(np.asarray([[token]], dtype=np.int64), position)[0, -1], state


class TorchBackend:
    name = "torch"

    def __init__(self, path: str, threads: int):
        import torch

        from perseus_edge.checkpoint import load_checkpoint

        torch.set_num_threads(threads)
        self.torch = torch
        self.model, _ = load_checkpoint(path, verify=False)
        self.max_context = self.model.cfg.max_position_embeddings
        self.cache_bytes = 0

    def prefill(self, ids: np.ndarray):
        with self.torch.inference_mode():
            logits, cache = self.model(self.torch.from_numpy(np.ascontiguousarray(ids)), use_cache=True)
        self.cache_bytes = sum(t.numel() * t.element_size() for layer in cache for t in layer)
        return logits[0, -1].numpy(), cache

    def restore(self, state) -> None:
        pass  # the cache tensors are never modified in place

    def step(self, token: int, position: int, state):
        with self.torch.inference_mode():
            logits, cache = self.model(self.torch.tensor([[token]]), state)
        return logits[0, -1].numpy(), cache


class Worker:
    def __init__(self, spec: dict):
        self.prompt = np.asarray(spec["prompt"], dtype=np.int64)
        t0 = time.perf_counter()
        if spec["backend"] == "torch":
            self.backend = TorchBackend(spec["path"], int(spec["threads"]))
        else:
            self.backend = OnnxBackend(spec["path"], int(spec["threads"]), spec.get("spin"))
        self.load_s = time.perf_counter() - t0
        self.prefilled: dict[int, tuple] = {}

    def pp(self, n: int) -> float:
        if n > len(self.prompt) or n > self.backend.max_context:
            raise ValueError(f"pp{n} needs {n} prompt tokens within the context {self.backend.max_context}")
        t0 = time.perf_counter()
        self.backend.prefill(self.prompt[None, :n])
        return n / (time.perf_counter() - t0)

    def tg(self, n: int, context: int) -> float:
        if context < 1 or context + n > self.backend.max_context or context > len(self.prompt):
            raise ValueError(f"tg{n} at context {context} does not fit (model context "
                             f"{self.backend.max_context}, prompt {len(self.prompt)} tokens)")
        if context not in self.prefilled:
            self.prefilled[context] = self.backend.prefill(self.prompt[None, :context])
        logits, state = self.prefilled[context]
        self.backend.restore(state)
        elapsed = 0.0
        for i in range(n):
            token = int(np.argmax(logits))  # greedy, outside the timed call
            t0 = time.perf_counter()
            logits, state = self.backend.step(token, context + i, state)
            elapsed += time.perf_counter() - t0
        return n / elapsed

    def ready(self) -> dict:
        return {"ready": True, "load_s": self.load_s, "max_context": self.backend.max_context,
                "cache_bytes": int(self.backend.cache_bytes), **rss_now()}

    def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "pp":
            return {"tok_s": self.pp(int(req["n"]))}
        if cmd == "tg":
            return {"tok_s": self.tg(int(req["n"]), int(req["context"]))}
        if cmd == "stats":
            now = rss_now()
            return {"peak_rss_bytes": now["peak"], **now, "cache_bytes": int(self.backend.cache_bytes)}
        raise ValueError(f"unknown request {req!r}")


if __name__ == "__main__":
    serve(make=Worker)  # the bench's line protocol (perseus_edge.bench.worker), with this study's workers
