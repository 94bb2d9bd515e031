"""Perplexity of an ONNX model folder, torch-free: the numbers a user's runtime would give.

The windows are those of the PyTorch evaluation (`perseus_edge.data.eval_batches`): sequential,
non-overlapping windows of `seq_len` tokens from the start of the text, `batch_size` per batch,
the tail shorter than a window dropped. Each batch is teacher-forced through the same graph the
generator runs, at position 0 with a fresh cache, and scored with a float64 log-softmax.
"""

from __future__ import annotations

import math
import os

import numpy as np

from perseus_edge.data import eval_batches
from perseus_edge.errors import PerseusError
from perseus_edge.runtime.model import Model


def _log_softmax_pick(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per position, float64; logits [..., V], targets [...]."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1)) + m[..., 0]
    return lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]


def evaluate(model_dir: str | os.PathLike, text_or_tokens, seq_len: int | None = None,
             max_batches: int | None = None, threads: int | None = None, batch_size: int = 8,
             low_memory: bool = False, format: str = "auto") -> dict:
    """{"loss": mean next-token NLL (nats), "ppl": exp(loss), "tokens": scored tokens}.

    text_or_tokens: a str (encoded with the folder's tokenizer) or an array of token ids.
    seq_len: window length (default: the model's context). max_batches: at most this many
    batches of `batch_size` windows, as `perseus eval` counts them for checkpoints.
    """
    if batch_size < 1:
        raise PerseusError(f"batch_size must be at least 1, got {batch_size}")
    model = Model(model_dir, threads=threads, low_memory=low_memory, batch=batch_size, format=format)
    if isinstance(text_or_tokens, str):
        if not text_or_tokens:
            raise PerseusError("no text to evaluate")
        tokens = np.asarray(model.tokenizer.encode(text_or_tokens, add_special_tokens=False).ids, np.int64)
    else:
        tokens = np.asarray(text_or_tokens)
    if tokens.ndim != 1:
        raise PerseusError(f"expected a 1-D token array, got shape {tokens.shape}")
    if seq_len is None:
        seq_len = model.max_context
    if seq_len < 1:
        raise PerseusError(f"seq_len must be at least 1, got {seq_len}")
    if seq_len > model.max_context:
        raise PerseusError(f"seq_len {seq_len} exceeds the model's context of {model.max_context}")
    if max_batches is not None and max_batches < 1:
        raise PerseusError(f"max_batches must be at least 1, got {max_batches}")
    vocab = model.spec.vocab_size
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab):
        raise PerseusError(f"token ids outside the model's vocabulary (0..{vocab - 1})")
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, seq_len, batch_size, max_batches):
        rows = x.shape[0]
        if rows < batch_size:  # last batch: pad with copies, score only the real rows
            x = np.concatenate([x, np.repeat(x[:1], batch_size - rows, 0)])
        model.cache.reset()
        logits = model.forward(x, 0)
        total += float(_log_softmax_pick(logits[:rows], y).sum())
        count += y.size
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf, "tokens": count}
