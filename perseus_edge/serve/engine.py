"""The scheduler: continuous batching of many requests over one model's cache slots.

One background thread owns the model. Each running request (a `Job`) holds one cache slot and
its own position; the loop repeats:

    1. drop cancelled jobs (client gone), freeing their slots
    2. prefill: the next waiting job takes the next free slot; one chunk of its prompt is run
       (the runtime's prefill chunk, `Model.prefill_chunk`: 64 tokens quantized, 128 fp32, 32 in
       low-memory mode; at most 64 while other requests decode, so a long prompt does not stall
       their streams); once its prompt is in,
       its first token is sampled and it joins the decoding jobs
    3. one batched decode step over every decoding job (each row at its own position), sample a
       token per row, hand out the text; a job that is done frees its slot for a waiting one

Decoding jobs occupy slots 0..n-1 and the job being prefilled slot n, so a decode step is one
graph run over contiguous cache rows: when a job in the middle finishes, the job in the last
decoding slot moves into its place, and the prefilling job down by one (`Model.copy_slot`, the
cached rows only). Waiting jobs are served first come, first served; the queue has a fixed
length and `submit` refuses beyond it (the server answers 429).

Events reach the submitter through `Job.on_event` (called on the engine thread): `Piece` for
text, then exactly one `Done` or `Failed`. Nothing here knows HTTP.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from perseus_edge.errors import PerseusError
from perseus_edge.modelfile.reader import ModelFolder
from perseus_edge.runtime.model import Model
from perseus_edge.runtime.stream import StopFilter, TextStream, token_bytes_table
from perseus_edge.sampling import Sampler

PREFILL_CHUNK_SHARED = 64  # prompt tokens per step while other requests decode


@dataclass
class Piece:
    text: str


@dataclass
class Done:
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens or the context)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


Event = Piece | Done | Failed


class QueueFull(PerseusError):
    """Every slot is busy and the waiting line is at its limit."""


@dataclass(eq=False)
class Job:
    """One generation request: what to do, where its events go, and its decoding state."""

    prompt: list[int]
    max_new_tokens: int  # already fits the context: len(prompt) + max_new_tokens <= context
    sampler: Sampler
    on_event: Callable[[Event], None]
    stops: Sequence[str] = ()
    ignore_eos: bool = False
    cancelled: bool = False  # set by any thread; the engine drops the job at its next iteration
    # decoding state (engine thread only)
    position: int = 0  # tokens in the cache
    token: int = -1  # sampled, not yet fed
    generated: int = 0
    history: list[int] = field(default_factory=list)
    text: TextStream | None = None
    stopper: StopFilter | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Owns a batched Model and the thread that decodes every running Job together."""

    def __init__(self, folder: ModelFolder, slots: int = 8, threads: int | None = None,
                 low_memory: bool = False, max_waiting: int = 64):
        if slots < 1:
            raise PerseusError(f"slots must be at least 1, got {slots}")
        if max_waiting < 0:
            raise PerseusError(f"the waiting-queue limit must be >= 0, got {max_waiting}")
        self.model = Model(folder, threads=threads, low_memory=low_memory, batch=slots)
        self.folder = folder
        self.slots = slots
        self.max_waiting = max_waiting
        self.eos_ids = set(folder.eos_ids)
        self.shared_chunk = min(self.model.prefill_chunk, PREFILL_CHUNK_SHARED)
        self._bytes = token_bytes_table(folder.tokenizer)
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []  # decoding: job i holds cache slot i
        self._filling: Job | None = None  # prefilling, in slot len(self._running)
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="perseus-engine", daemon=True)
        self.steps = 0  # batched decode steps run (for /health and tests)
        self.busiest = 0  # most jobs ever decoded in one step

    @property
    def max_context(self) -> int:
        return self.model.max_context

    # ------------------------------------------------------------------ any thread
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when the waiting line is at its limit."""
        with self._wake:
            if self._stop or not self._thread.is_alive():
                raise PerseusError("the engine is not running (shutting down or stopped by an error)")
            free = self.slots - self._busy()
            if len(self._waiting) >= self.max_waiting + free:
                raise QueueFull(f"server busy: {self._busy()} requests running and "
                                f"{len(self._waiting)} waiting (the limit); retry later")
            self._waiting.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self._wake:
            self._wake.notify()

    def stats(self) -> dict:
        with self._wake:
            return {"slots": self.slots, "running": self._busy(), "waiting": len(self._waiting),
                    "max_waiting": self.max_waiting, "steps": self.steps, "busiest_step": self.busiest,
                    "alive": self._thread.is_alive()}

    def _busy(self) -> int:
        """Slots in use: decoding jobs and the one being prefilled."""
        return len(self._running) + (self._filling is not None)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while True:
                        if any(j.cancelled for j in self._waiting):  # clients gone while waiting
                            self._waiting = deque(j for j in self._waiting if not j.cancelled)
                        if self._stop or self._running or self._filling or self._waiting:
                            break
                        self._wake.wait()
                    if self._stop:
                        break
                    if self._filling is None and self._waiting and len(self._running) < self.slots:
                        self._filling = self._waiting.popleft()
                        self._start(self._filling)
                for job in [j for j in self._running if j.cancelled]:
                    self._release(job)
                if self._filling is not None:
                    self._prefill()
                if self._running:
                    self._step()
        finally:
            with self._wake:
                self._stop = True  # refuse new jobs from now on
                left = list(self._waiting) + self._running + [j for j in [self._filling] if j]
                self._waiting.clear()
                self._running.clear()
                self._filling = None
            for job in left:
                job.on_event(Failed("the server is shutting down"))

    def _release(self, job: Job) -> None:
        """Free a decoding job's slot, keeping the slots in use contiguous: the last decoding job
        moves into it, and the prefilling job down into the last decoding slot."""
        i, last = self._running.index(job), len(self._running) - 1
        if i != last:
            moved = self._running[last]
            self.model.copy_slot(last, i, moved.position)
            self._running[i] = moved
        self._running.pop()
        if self._filling is not None:
            self.model.copy_slot(last + 1, last, self._filling.position)

    def _fail(self, job: Job, error: Exception) -> None:
        job.on_event(Failed(str(error) if isinstance(error, PerseusError)
                            else f"internal error: {type(error).__name__}: {error}"))

    def _start(self, job: Job) -> None:
        job.text = TextStream(self.folder.tokenizer, self._bytes)
        job.stopper = StopFilter(job.stops)
        job.history = list(job.prompt)
        job.position = 0

    def _prefill(self) -> None:
        """One chunk of the prefilling job's prompt; the last one samples its first token."""
        job, slot = self._filling, len(self._running)
        if job.cancelled:
            self._filling = None
            return
        chunk = self.shared_chunk if self._running else self.model.prefill_chunk
        try:
            ids = np.asarray([job.prompt[job.position:job.position + chunk]], dtype=np.int64)
            logits = self.model.forward(ids, job.position, slot=slot, last_only=True)
            job.position += ids.shape[1]
            if job.position < len(job.prompt):
                return
            self._filling = None
            if not self._sampled(job, logits[0, -1]):
                self._running.append(job)  # it is in slot len(self._running) already
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
            self._filling = None
            self._fail(job, e)

    def _step(self) -> None:
        jobs = list(self._running)
        ids = np.asarray([[j.token] for j in jobs], dtype=np.int64)
        positions = np.asarray([j.position for j in jobs], dtype=np.int64)
        try:
            logits = self.model.forward(ids, positions, slot=0)
        except Exception as e:  # noqa: BLE001
            for job in jobs:
                self._fail(job, e)
                self._release(job)
            return
        self.steps += 1
        self.busiest = max(self.busiest, len(jobs))
        finished = []
        for row, job in enumerate(jobs):
            job.position += 1
            try:
                done = self._sampled(job, logits[row, -1])
            except Exception as e:  # noqa: BLE001
                self._fail(job, e)
                done = True
            if done:
                finished.append(job)
        for job in finished:  # after the loop: releasing moves jobs between slots
            self._release(job)

    def _sampled(self, job: Job, logits: np.ndarray) -> bool:
        """Sample the job's next token, emit its text; True when the job is over."""
        if job.cancelled:
            return True
        token = job.sampler.sample(logits, job.history)
        job.generated += 1
        job.history.append(token)
        job.token = token
        ends = token in self.eos_ids and not job.ignore_eos
        if not ends:
            piece = job.stopper.push(job.text.push(token))
            if piece:
                job.on_event(Piece(piece))
        if ends or job.stopper.stopped:
            reason = "stop"
        elif job.generated >= job.max_new_tokens:
            reason = "length"
        else:
            return False
        tail = job.stopper.push(job.text.flush()) + job.stopper.flush()
        if tail:
            job.on_event(Piece(tail))
        job.on_event(Done(reason, len(job.prompt), job.generated))
        return True
