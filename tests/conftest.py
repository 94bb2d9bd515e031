"""Shared fixtures: a small tokenizer trained on a slice of the valid split, and tiny checkpoints.

Tests are hermetic: the corpus is the sample committed in data/sample (never ../shared), and
HOME, XDG_CACHE_HOME and PERSEUS_CACHE point into one temp folder per session, so no test reads
or writes the user's caches and each session starts from scratch. Subprocesses inherit this.
"""

from __future__ import annotations

import lzma
import os
import tempfile
from pathlib import Path

import pytest

from perseus_edge.data import BUNDLED_DATA

DATA_DIR = BUNDLED_DATA
_SESSION_HOME = tempfile.mkdtemp(prefix="perseus-tests-")


def pytest_configure(config):
    os.environ["HOME"] = _SESSION_HOME
    os.environ["XDG_CACHE_HOME"] = os.path.join(_SESSION_HOME, ".cache")
    os.environ["PERSEUS_CACHE"] = os.path.join(_SESSION_HOME, "tokens")
    os.environ["PERSEUS_DATA_DIR"] = str(DATA_DIR)


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The committed corpus sample: full valid and test splits, the first ~400k chars of train."""
    return DATA_DIR


TINY_VOCAB = 512


@pytest.fixture(scope="session")
def valid_text() -> str:
    """The first 300k characters of the valid split (never train on test)."""
    with lzma.open(DATA_DIR / "valid.txt.xz", "rt", encoding="utf-8") as f:
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
    from perseus_edge.checkpoint import random_checkpoint
    from perseus_edge.model.config import preset

    cache: dict = {}

    def make(arch: str = "moe-mla-rope", seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"ckpt-{arch}") / "ckpt"
            cache[key] = random_checkpoint(folder, preset("tiny", arch, **overrides), tiny_tokenizer, seed)
        return cache[key]

    return make
