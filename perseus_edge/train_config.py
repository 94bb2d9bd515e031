"""`TrainConfig`: every setting of a training run, torch-free.

The one place the defaults live: `perseus train` reads its option defaults from here, and
`perseus_edge.train` (torch) runs what it describes.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    seed: int = 0
    compile: bool = False
    router_bias_rate: float | None = None  # override the preset's router_bias_update_rate (MoE balancing speed)
    max_chars: int | None = None     # tokenize only a prefix of the train split (smoke runs)
    data_dir: str | None = None
    tokenizer: str | None = None     # tokenizer.json (default: the shipped one)
    out: str = "runs/default"
    resume: bool = False
    log_every: int = 10
    progress: bool = True
