"""Text generation: prompt -> prefill -> decode loop -> text, with streaming and timings.

    gen = Generator("models/tiny-onnx", threads=1)
    for piece in gen.stream("Once upon a time", max_new_tokens=64, temperature=0.8, seed=1):
        print(piece, end="", flush=True)
    print(gen.last_result.timings.report())

Context policy (the model's context C is the cache length of the exported graph; prompt and
generated tokens share it, as in the PyTorch reference):
  - `max_new_tokens` must be in 1..C-1; the prompt must hold at least one token.
  - prompt + max_new_tokens <= C: generate normally.
  - the prompt fits but prompt + max_new_tokens does not: generate until the context is full, then
    stop with stop_reason "context" and a note saying so (no wrap-around, no garbage).
  - the prompt itself does not fit (len >= C): a PerseusError, unless truncate="left".
  - truncate="left": whenever prompt + max_new_tokens > C, drop the oldest prompt tokens so that
    exactly C - max_new_tokens remain; all requested tokens then fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from perseus_edge.errors import PerseusError
from perseus_edge.runtime.model import Model
from perseus_edge.sampling import Sampler
from perseus_edge.runtime.stream import StopFilter, TextStream, token_bytes_table
from perseus_edge.runtime.timings import Timings, anon_rss_bytes, now, peak_rss_bytes

TRUNCATE = ("none", "left")


@dataclass
class Result:
    text: str  # generated text (EOS / stop token and stop string not included)
    tokens: list[int]  # generated ids, including a final EOS or stop token
    prompt_tokens: list[int]  # ids that were fed (after truncation)
    stop_reason: str  # eos | stop | length | context | interrupted
    timings: Timings = field(default_factory=Timings)
    truncated: int = 0  # prompt tokens dropped by truncate="left"
    note: str = ""  # one line for the user (context full, prompt truncated)


class Generator:
    """Generation over one model folder (ONNX Runtime + numpy + tokenizers; no torch)."""

    def __init__(self, model_dir: str | os.PathLike, threads: int | None = None,
                 low_memory: bool = False, format: str = "auto", verify: bool = True):
        t0 = now()
        self.model = Model(model_dir, threads=threads, low_memory=low_memory, format=format, verify=verify)
        self.load_s = now() - t0
        self.tokenizer = self.model.tokenizer
        self.eos_ids = set(self.model.folder.eos_ids)
        self._bytes = token_bytes_table(self.tokenizer)
        self.last_result: Result | None = None

    @property
    def max_context(self) -> int:
        return self.model.max_context

    # ------------------------------------------------------------------ inputs
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Prompt text (or ids, passed through) -> ids; rejects empty and non-UTF-8 text."""
        if isinstance(prompt, (bytes, bytearray)):
            try:
                prompt = bytes(prompt).decode("utf-8")
            except UnicodeDecodeError as e:
                raise PerseusError(f"prompt is not valid UTF-8 (byte 0x{prompt[e.start]:02x} at "
                                   f"offset {e.start})") from None
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates: undecodable bytes from argv
                raise PerseusError(f"prompt is not valid UTF-8 (undecodable byte at character "
                                   f"{e.start})") from None
            if not prompt:
                raise PerseusError("empty prompt: give at least one character of text")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            ids = [int(i) for i in prompt]
            vocab = self.model.spec.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise PerseusError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if not ids:
            raise PerseusError("empty prompt: give at least one token")
        return ids

    def fit_context(self, ids: list[int], max_new_tokens: int, truncate: str = "none") -> tuple[list[int], int, int]:
        """Apply the context policy: (ids to feed, tokens dropped, new tokens that fit)."""
        ctx = self.max_context
        if truncate not in TRUNCATE:
            raise PerseusError(f"unknown truncate policy {truncate!r} (choose from {', '.join(TRUNCATE)})")
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise PerseusError(f"the number of new tokens must be at least 1, got {max_new_tokens}")
        if max_new_tokens >= ctx:
            raise PerseusError(f"{max_new_tokens} new tokens do not fit the model's context of {ctx} "
                               f"tokens (the prompt needs at least one): use at most {ctx - 1}")
        dropped = 0
        if len(ids) + max_new_tokens > ctx:
            if truncate == "left":
                dropped = len(ids) + max_new_tokens - ctx
                ids = ids[dropped:]
            elif len(ids) >= ctx:
                raise PerseusError(f"the prompt has {len(ids)} tokens but the model's context is {ctx} "
                                   f"(use --truncate left to keep the last {ctx - max_new_tokens})")
        return ids, dropped, min(max_new_tokens, ctx - len(ids))

    def sampler(self, temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=None) -> Sampler:
        """A Sampler; parameters left None come from generation_config.json, then greedy defaults."""
        return Sampler.with_defaults(self.model.folder.generation, temperature, top_k, top_p,
                                     repetition_penalty, seed)

    # ------------------------------------------------------------------ generation
    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, *,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop: Sequence[str] = (), stop_tokens: Sequence[int] = (), truncate: str = "none",
               ignore_eos: bool = False) -> Iterator[str]:
        """Text pieces as they become printable. Arguments are checked before this returns.

        When the iterator ends (exhausted, closed early, or interrupted by Ctrl-C) the
        `last_result` attribute holds the Result with timings.
        """
        t_start = now()
        sampler = self.sampler(temperature, top_k, top_p, repetition_penalty, seed)
        if isinstance(stop, str):
            stop = [stop]
        ids, dropped, budget = self.fit_context(self.encode(prompt), max_new_tokens, truncate)
        return self._run(ids, dropped, budget, max_new_tokens, sampler, list(stop),
                         set(int(t) for t in stop_tokens), ignore_eos, t_start)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, **kwargs) -> Result:
        """Generate to the end; returns Result(text, tokens, timings, ...). Same arguments as stream."""
        for _ in self.stream(prompt, max_new_tokens, **kwargs):
            pass
        return self.last_result

    def _run(self, ids, dropped, budget, requested, sampler, stops, stop_tokens, ignore_eos, t_start):
        model, ctx = self.model, self.max_context
        text = TextStream(self.tokenizer, self._bytes)
        stopper = StopFilter(stops)
        timings = Timings(load_s=self.load_s, threads=model.threads)
        generated: list[int] = []
        pieces: list[str] = []
        reason = "interrupted"
        history = list(ids)
        note = (f"prompt truncated: dropped the first {dropped} tokens to fit the context of {ctx}"
                if dropped else "")
        try:
            t0 = now()
            chunk = model.prefill_chunk
            for s in range(0, len(ids), chunk):
                logits = model.forward(np.asarray([ids[s:s + chunk]]), s, last_only=True)
            last = logits[0, -1]
            timings.prompt_s, timings.prompt_tokens = now() - t0, len(ids)
            for i in range(budget):
                t1 = now()
                token = sampler.sample(last, history)
                timings.sample_s += now() - t1
                if i == 0:
                    timings.ttft_s = now() - t_start
                generated.append(token)
                history.append(token)
                ends = (token in self.eos_ids and not ignore_eos) or token in stop_tokens
                if not ends:
                    piece = stopper.push(text.push(token))
                    if piece:
                        pieces.append(piece)
                        yield piece
                if ends or stopper.stopped:
                    reason = "stop" if stopper.stopped or token in stop_tokens else "eos"
                    break
                if i + 1 == budget:
                    reason = "length" if budget == requested else "context"
                    break
                t1 = now()
                last = model.forward(np.asarray([[token]]), len(ids) + i)[0, -1]
                timings.decode_s += now() - t1
                timings.decode_tokens += 1
            tail = stopper.push(text.flush())
            tail += stopper.flush()
            if tail:
                pieces.append(tail)
                yield tail
            if reason == "context":
                note = (f"context full: stopped after {len(generated)} of {requested} tokens "
                        f"(model context {ctx} tokens)")
        finally:
            timings.total_s = now() - t_start
            timings.peak_rss = peak_rss_bytes()
            timings.anon_rss = anon_rss_bytes()
            self.last_result = Result("".join(pieces), generated, list(ids), reason, timings, dropped, note)
