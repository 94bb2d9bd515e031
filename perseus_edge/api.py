"""The Python API: load a model folder once, then generate, stream, score.

    import perseus_edge
    lm = perseus_edge.load("model-int8/", threads=2)
    print(lm.generate("Once upon a time", max_new_tokens=64, temperature=0.8, seed=1))
    for piece in lm.stream("The old captain", max_new_tokens=32):
        print(piece, end="", flush=True)
    lm.score("It was a dark and stormy night.").perplexity

A thin, typed face over `perseus_edge.runtime.Generator` (the same object `perseus run` uses):
one model, one sequence at a time, torch-free. For many concurrent requests use `perseus serve`.
Sampling arguments left None come from the folder's generation_config.json, else greedy.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from perseus_edge.errors import PerseusError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from perseus_edge.runtime.generate import Generator, Result


@dataclass(frozen=True)
class Score:
    """Teacher-forced loss of a text: mean next-token negative log-likelihood in nats."""

    loss: float
    perplexity: float
    tokens: int  # tokens scored (every token of the text but the first)


class LanguageModel:
    """An exported model folder, loaded: `generate`, `stream`, `logits`, `score`, `tokenizer`."""

    def __init__(self, generator: Generator):
        self._gen = generator

    # ------------------------------------------------------------------ what it is
    @property
    def tokenizer(self) -> Tokenizer:
        return self._gen.tokenizer

    @property
    def max_context(self) -> int:
        """Tokens the model sees at once (prompt and generated tokens share it)."""
        return self._gen.max_context

    @property
    def path(self) -> str:
        return str(self._gen.model.folder.path)

    @property
    def last_result(self) -> Result | None:
        """The last `generate`/`stream` call's Result: tokens, stop reason, timings."""
        return self._gen.last_result

    def encode(self, text: str) -> list[int]:
        return self._gen.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    # ------------------------------------------------------------------ generation
    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, *,
               temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, repetition_penalty: float | None = None,
               seed: int | None = None, stop: str | Sequence[str] = (),
               ignore_eos: bool = False, truncate: str = "none") -> Iterator[str]:
        """Text pieces as they are generated (valid UTF-8 each; stop strings never appear).

        Arguments are checked before the iterator is returned. `truncate="left"` keeps the last
        prompt tokens when prompt + max_new_tokens exceeds the context; "none" raises instead.
        """
        return self._gen.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                                stop=[stop] if isinstance(stop, str) else list(stop),
                                ignore_eos=ignore_eos, truncate=truncate)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, **sampling) -> str:
        """The generated text (prompt not included). Same arguments as `stream`."""
        return "".join(self.stream(prompt, max_new_tokens, **sampling))

    # ------------------------------------------------------------------ scoring
    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Next-token logits [len(ids), vocab] (float32) for one sequence starting at position 0."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise PerseusError(f"logits() takes a non-empty 1-D sequence of token ids, got shape {ids.shape}")
        ids = self._gen.encode(ids.tolist())  # range check
        if len(ids) > self.max_context:
            raise PerseusError(f"{len(ids)} tokens exceed the model's context of {self.max_context}")
        model = self._gen.model
        chunk = model.prefill_chunk
        rows = [model.forward(np.asarray([ids[s:s + chunk]]), s)[0].astype(np.float32, copy=True)
                for s in range(0, len(ids), chunk)]
        return np.concatenate(rows)

    def score(self, text: str) -> Score:
        """Loss of `text` under the model, in windows of the model's context (each from position 0)."""
        ids = self.encode(text)
        if len(ids) < 2:
            raise PerseusError("score() needs a text of at least two tokens")
        total, count, ctx = 0.0, 0, self.max_context
        for s in range(0, len(ids) - 1, ctx):
            window = ids[s:s + ctx + 1]  # ctx inputs, each predicting the next id
            x = self.logits(window[:-1]).astype(np.float64)
            m = x.max(-1)
            lse = np.log(np.exp(x - m[:, None]).sum(-1)) + m
            total += float((lse - x[np.arange(len(x)), window[1:]]).sum())
            count += len(x)
        loss = total / count
        return Score(loss, math.exp(loss) if loss < 700 else math.inf, count)

    def __repr__(self) -> str:
        return f"LanguageModel({self.path}, context {self.max_context}, threads {self._gen.model.threads})"


def load(folder: str | os.PathLike, threads: int | None = None, *, low_memory: bool = False,
         format: str = "auto", verify: bool = True) -> LanguageModel:
    """Load an exported model folder (`perseus export` / `perseus quantize`) for generation.

    threads: ONNX Runtime intra-op threads (None: one per physical core). low_memory: no arena,
    no prepacking (mobile-class devices). format: auto, onnx or ort. verify: check every file's
    sha256 against manifest.json first.
    """
    from perseus_edge.runtime.generate import Generator

    return LanguageModel(Generator(folder, threads=threads, low_memory=low_memory, format=format,
                                   verify=verify))
