"""The sampler: one next-token id from one row of logits. Pure numpy, no state but the RNG.

Shared by the ONNX runtime and the PyTorch reference generator, so both pick the same token for
the same logits. The steps, in order (as in HF `generate` and llama.cpp's default chain):

    1. repetition penalty  every distinct id in `history`: logit / p if logit > 0 else logit * p
    2. greedy              temperature == 0: argmax (lowest id wins a tie), no RNG draw
    3. temperature         logits / t
    4. top-k               keep the k largest logits (k = 0: all)
    5. softmax             in float64
    6. top-p (nucleus)     keep the smallest prefix of the sorted distribution whose mass >= p
    7. draw                one uniform from the seeded np.random.Generator, inverse CDF

Sorting is stable (ties keep the lower id first), so a run is reproducible bit for bit from the
seed on any machine with the same logits.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from perseus_edge.errors import PerseusError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, seed: int | None = None):
        for name, v in (("temperature", temperature), ("top_p", top_p),
                        ("repetition_penalty", repetition_penalty)):
            if not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise PerseusError(f"{name} must be a finite number, got {v!r}")
        if temperature < 0:
            raise PerseusError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise PerseusError(f"top_p must be in (0, 1], got {top_p}")
        if not isinstance(top_k, numbers.Integral) or top_k < 0:
            raise PerseusError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
        if repetition_penalty <= 0:
            raise PerseusError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
        if seed is not None and (not isinstance(seed, numbers.Integral) or seed < 0):
            raise PerseusError(f"seed must be a non-negative integer, got {seed!r}")
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.repetition_penalty = float(repetition_penalty)
        self.seed = None if seed is None else int(seed)
        self.rng = np.random.default_rng(self.seed)

    @classmethod
    def with_defaults(cls, generation: dict, temperature=None, top_k=None, top_p=None,
                      repetition_penalty=None, seed=None) -> "Sampler":
        """A Sampler whose parameters left None come from a model's generation_config.json, then
        greedy defaults (`do_sample: false` means greedy unless a temperature is given, as in HF)."""
        g = dict(generation)
        if g.get("do_sample") is False:
            g["temperature"] = 0.0

        def pick(value, key, default):
            return value if value is not None else g.get(key, default)

        return cls(temperature=pick(temperature, "temperature", 0.0), top_k=pick(top_k, "top_k", 0),
                   top_p=pick(top_p, "top_p", 1.0),
                   repetition_penalty=pick(repetition_penalty, "repetition_penalty", 1.0), seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __repr__(self) -> str:
        return (f"Sampler(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
                f"repetition_penalty={self.repetition_penalty}, seed={self.seed})")

    def penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Step 1 on a float64 copy (HF's RepetitionPenaltyLogitsProcessor, llama.cpp's repeat penalty)."""
        logits = np.array(logits, dtype=np.float64)
        if self.repetition_penalty != 1.0 and len(history):
            ids = np.unique(np.asarray(history, dtype=np.int64))
            ids = ids[(ids >= 0) & (ids < logits.shape[0])]
            seen = logits[ids]
            logits[ids] = np.where(seen > 0, seen / self.repetition_penalty,
                                   seen * self.repetition_penalty)
        return logits

    def _nucleus(self, logits: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Steps 1 and 3-6: candidate ids, best first, and their probabilities (float64, sum 1)."""
        x = self.penalize(logits, history) / self.temperature
        if 0 < self.top_k < len(x):
            # only the candidates need sorting: every id at or above the k-th largest value
            # (ties included, so the first k are exactly those of a full stable sort)
            kth = np.partition(x, len(x) - self.top_k)[len(x) - self.top_k]
            cand = np.flatnonzero(x >= kth)
            order = cand[np.argsort(-x[cand], kind="stable")][: self.top_k]
        else:
            order = np.argsort(-x, kind="stable")
        kept = x[order]
        p = np.exp(kept - kept[0])
        p /= p.sum()
        if self.top_p < 1.0:
            # token i stays while the mass before it is < top_p; the first one always stays
            n = max(1, int(np.count_nonzero(np.cumsum(p) - p < self.top_p)))
            order, p = order[:n], p[:n] / p[:n].sum()
        return order, p

    def probs(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """The distribution `sample` draws from, float64 [vocab], zero where cut (one-hot if greedy)."""
        out = np.zeros(np.shape(logits)[-1], dtype=np.float64)
        if self.greedy:
            out[int(np.argmax(self.penalize(logits, history)))] = 1.0
        else:
            order, p = self._nucleus(logits, history)
            out[order] = p
        return out

    def sample(self, logits_1d: np.ndarray, history: Sequence[int] = ()) -> int:
        """Next token id for one row of logits; `history` = ids seen so far (prompt + generated)."""
        logits_1d = np.asarray(logits_1d)
        if logits_1d.ndim != 1 or logits_1d.shape[0] == 0:
            raise ValueError(f"sample() takes one row of logits, got shape {logits_1d.shape}")
        if np.isnan(logits_1d).any():
            raise PerseusError("the model produced NaN logits (corrupt weights or a broken export)")
        if self.greedy:
            return int(np.argmax(self.penalize(logits_1d, history)))
        order, p = self._nucleus(logits_1d, history)
        cdf = np.cumsum(p)
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(order[min(i, len(order) - 1)])
