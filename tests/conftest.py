"""Shared fixtures: a small tokenizer trained on a slice of the valid split, and tiny checkpoints.

Everything is built in temp folders from data in ../shared/data, so tests never touch the network
or the committed models, and each test session starts from scratch.
"""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from perseus_edge.data import resolve_data_dir

TINY_VOCAB = 512


@pytest.fixture(scope="session")
def valid_text() -> str:
    """The first 300k characters of the valid split (never train on test)."""
    with lzma.open(resolve_data_dir(None) / "valid.txt.xz", "rt", encoding="utf-8") as f:
        return f.read(300_000)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, valid_text) -> Path:
    """tokenizer.json with vocab 512, matching the `tiny` preset."""
    from perseus_edge.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    src = folder / "text.txt"
    src.write_text(valid_text, encoding="utf-8")
    out = folder / "tokenizer.json"
    train_tokenizer([src], vocab_size=TINY_VOCAB, out_path=out)
    return out


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tiny_tokenizer):
    """Factory: make_checkpoint(arch="moe-mla-rope", seed=0, **overrides) -> checkpoint folder.

    Randomly initialised `tiny` preset (router biases perturbed so routing is non-trivial),
    cached per argument set for the whole session.
    """
    import torch

    from perseus_edge.checkpoint import save_checkpoint
    from perseus_edge.model.config import preset
    from perseus_edge.model.transformer import PerseusLM

    cache: dict = {}

    def make(arch: str = "moe-mla-rope", seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            torch.manual_seed(seed)
            model = PerseusLM(preset("tiny", arch, **overrides))
            for router in model.routers():
                router.e_score_correction_bias.normal_(0, 0.05)
            folder = tmp_path_factory.mktemp(f"ckpt-{arch}") / "ckpt"
            save_checkpoint(folder, model, tiny_tokenizer)
            cache[key] = folder
        return cache[key]

    return make
