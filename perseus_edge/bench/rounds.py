"""`perseus bench`: time model folders and GGUF files in interleaved rounds, llama-bench style.

    tests = make_tests(pp=[256], tg=[128], depths=[0, 900])   # pp256, tg128, pp256 @ d900, tg128 @ d900
    records = run_bench(["model-int8/", "model-q8_0.gguf"], tests, threads=[1, 2], reps=3)

One worker process (`worker.py`) per (model, threads), all started first; then every round asks
every worker for one repetition of every test, test by test, so a load spike from another job
on the machine hits every cell about alike (round 0 is a warm-up, discarded). A record holds
every repetition's tok/s and the worker's peak RSS.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from perseus_edge.errors import PerseusError


@dataclass(frozen=True)
class Test:
    __test__ = False  # not a pytest class
    kind: str  # "pp" (one batch of n prompt tokens) or "tg" (n one-token steps)
    n: int
    depth: int = 0  # tokens already in the cache

    @property
    def name(self) -> str:  # llama-bench's spelling
        return f"{self.kind}{self.n}" + (f" @ d{self.depth}" if self.depth else "")


def make_tests(pp: list[int], tg: list[int], depths: list[int]) -> list[Test]:
    """llama-bench's order: every pp then every tg, each at every depth; 0 tokens = no test."""
    return ([Test("pp", n, d) for n in pp if n for d in depths]
            + [Test("tg", n, d) for n in tg if n for d in depths])


@dataclass
class Model:
    """A -m argument: a model folder (onnxruntime) or a .gguf file (llama.cpp)."""

    path: Path
    backend: str

    @property
    def name(self) -> str:
        return self.path.resolve().name


def resolve_model(arg: str) -> Model:
    path = Path(arg)
    if path.is_file() and path.suffix == ".gguf":
        from perseus_edge.bench.llama import require

        require()
        return Model(path, "llama.cpp")
    if path.is_dir():
        if not any((path / g).is_file() for g in ("model.onnx", "model.ort")):
            raise PerseusError(f"{arg} is not a model folder (no model.onnx or model.ort): "
                               f"export one with `perseus export CKPT -o FOLDER`")
        return Model(path, "onnxruntime")
    if not path.exists():
        raise PerseusError(f"model not found: {arg}")
    raise PerseusError(f"{arg} is neither a model folder nor a .gguf file")


def prompt_for(models: list[Model], n_tokens: int) -> list[int]:
    """The prompt's ids with the first model folder's tokenizer (GGUF files we write carry the
    same vocabulary), else the shipped tokenizer: every engine gets the same ids."""
    from perseus_edge.bench.prompts import prompt_ids
    from perseus_edge.tokenizer import DEFAULT_TOKENIZER

    folders = [m.path / "tokenizer.json" for m in models if m.backend == "onnxruntime"]
    return prompt_ids(next((f for f in folders if f.is_file()), DEFAULT_TOKENIZER), n_tokens)


class LineWorker:
    """A process running `python -m MODULE` that speaks `worker.serve`'s line protocol: `ask`
    sends one request line and returns the answer; the first answer (to `spec`) is `info`."""

    def __init__(self, module: str, spec: dict, where: str, env: dict | None = None):
        self.where = where  # names the worker in errors
        self.log = tempfile.TemporaryFile(mode="w+")  # the worker's stderr (a pipe could fill and block)
        self.proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self.info = self.ask(spec)

    def ask(self, req: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.proc.wait()
            self.log.seek(0)
            tail = " ".join(self.log.read().strip().splitlines()[-3:])[-400:]
            raise PerseusError(f"{self.where}: worker died (exit code {code}): {tail}")
        out = json.loads(line)
        if "error" in out:
            raise PerseusError(f"{self.where}: {out['error']}")
        return out

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self.log.close()


class WorkerProcess(LineWorker):
    """A `perseus_edge.bench.worker` process for one model at one thread count."""

    def __init__(self, model: Model, threads: int, prompt: list[int], depth: int):
        self.model, self.threads = model, threads
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
        super().__init__("perseus_edge.bench.worker",
                         {"path": str(model.path), "threads": threads, "prompt": prompt, "depth": depth},
                         f"{model.path} ({threads} threads)", env)


def schedule(n_workers: int, tests: list[Test], reps: int) -> list[tuple[int, Test, int]]:
    """(round, test, worker) in the order they run: round 0 (warm-up) first, and within a round
    every worker does a test before any worker does the next."""
    return [(r, t, w) for r in range(reps + 1) for t in tests for w in range(n_workers)]


def run_rounds(n_workers: int, tests: list[Test], reps: int, ask: Callable[[int, Test], float],
               progress: Callable[[], None] = lambda: None) -> dict[tuple[int, Test], list[float]]:
    """tok/s samples per (worker, test), warm-up round dropped."""
    samples: dict[tuple[int, Test], list[float]] = {}
    for r, test, w in schedule(n_workers, tests, reps):
        tok_s = ask(w, test)
        if r:
            samples.setdefault((w, test), []).append(tok_s)
        progress()
    return samples


def run_bench(paths: list[str], tests: list[Test], threads: list[int], reps: int,
              log: Callable[[str], None] | None = None) -> list[dict]:
    """Every (model, threads, test) cell, `reps` interleaved repetitions each -> one record per cell."""
    from rich.progress import Progress

    if not tests:
        raise PerseusError("nothing to run: every -p and -n is 0")
    models = [resolve_model(p) for p in paths]
    prompt = prompt_for(models, max(t.depth + t.n for t in tests))
    depth = max(t.depth for t in tests)
    workers: list[WorkerProcess] = []
    with Progress(transient=True, console=_stderr_console()) as bar:
        try:
            task = bar.add_task("loading", total=len(models) * len(threads))
            for m in models:
                for t in threads:
                    workers.append(WorkerProcess(m, t, prompt, depth))
                    bar.advance(task)
            for w in workers:  # every test fits every model, or nothing runs
                need = max(t.depth + t.n for t in tests)
                if need > w.info["max_context"]:
                    raise PerseusError(f"{w.model.path} holds {w.info['max_context']} positions; the tests "
                                       f"need {need} (depth + tokens)")
            bar.update(task, description="timing", completed=0,
                       total=len(schedule(len(workers), tests, reps)))
            samples = run_rounds(len(workers), tests, reps,
                                 lambda w, t: workers[w].ask({"cmd": t.kind, "n": t.n, "depth": t.depth})["tok_s"],
                                 progress=lambda: bar.advance(task))
            stats = [w.ask({"cmd": "stats"}) for w in workers]
        finally:
            for w in workers:
                w.close()
    records = []
    for i, w in enumerate(workers):
        for t in tests:
            ts = samples[(i, t)]
            records.append({
                "model": w.model.name, "path": str(w.model.path), "backend": w.info["backend"],
                "version": w.info["version"], "size_bytes": w.info["size_bytes"], "params": w.info["params"],
                "threads": w.threads, "test": t.name, "n_prompt": t.n if t.kind == "pp" else 0,
                "n_gen": t.n if t.kind == "tg" else 0, "n_depth": t.depth,
                "avg_ts": statistics.fmean(ts), "stddev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                "samples_ts": ts, "peak_rss_bytes": stats[i]["peak_rss_bytes"]})
    return records


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
