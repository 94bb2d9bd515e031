"""`TrainConfig`: every setting of a training run, torch-free.

The one place the defaults live: `perseus train` reads its option defaults from here, and
`perseus_edge.train` (torch) runs what it describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from perseus_edge.errors import PerseusError


@dataclass
class TrainConfig:
    preset: str = "tiny"
    arch: str = "moe-mla-rope"
    optimizer: str = "muon"          # muon | adamw
    lr: float = 3e-3                 # peak lr of the hidden matrices (Muon, or AdamW when optimizer=adamw)
    adam_lr: float = 3e-3            # peak lr of embeddings, head, norms, router (always AdamW)
    weight_decay: float = 0.0
    batch_size: int = 16             # sequences per process per step
    seq_len: int = 256
    steps: int = 300
    warmup: int = 30
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    patience: int = 0                # stop after this many evaluations without a new best valid loss (0: never)
    seed: int = 0
    compile: bool = False
    router_bias_rate: float | None = None  # override the preset's router_bias_update_rate (MoE balancing speed)
    max_chars: int | None = None     # tokenize only a prefix of the train split (smoke runs)
    data_dir: str | None = None
    tokenizer: str | None = None     # tokenizer.json (default: the shipped one)
    out: str = "runs/default"
    resume: bool = False
    force: bool = False              # start over in a run folder that already holds a run
    log_every: int = 10
    progress: bool = True

    def validate(self) -> None:
        """Every number in range before any work: a bad flag is one error line, never a run
        that silently does nothing (steps 0) or trains on NaN (lr nan)."""
        def positive(name: str, value, integer: bool = True) -> None:
            ok = (isinstance(value, int) and value >= 1) if integer else \
                (isinstance(value, (int, float)) and math.isfinite(value) and value > 0)
            if not ok:
                kind = "a positive integer" if integer else "a positive finite number"
                raise PerseusError(f"--{name.replace('_', '-')} must be {kind}, got {value}")

        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every"):
            positive(name, getattr(self, name))
        for name in ("lr", "adam_lr", "grad_clip"):
            positive(name, getattr(self, name), integer=False)
        for name in ("weight_decay", "warmup", "seed", "patience") + (("router_bias_rate",) if self.router_bias_rate is not None else ()):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise PerseusError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.max_chars is not None:
            positive("max_chars", self.max_chars)
        if self.optimizer not in ("muon", "adamw"):
            raise PerseusError(f"unknown optimizer {self.optimizer!r} (choose muon or adamw)")
        if self.resume and self.force:
            raise PerseusError("--resume continues a run and --force starts it over: give one of them")

