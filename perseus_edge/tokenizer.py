"""Byte-level BPE tokenizer: training, loading, and the vocab check against a checkpoint.

Byte-level means the 256 byte symbols are always in the vocabulary, so any Unicode string (emoji,
CJK, control characters) encodes without an unknown token and decodes back exactly. No normalizer
is set, so nothing is rewritten on the way in. Torch-free: the tokenizer ships with edge builds.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from perseus_edge.data import iter_paragraph_chunks
from perseus_edge.errors import PerseusError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]  # ids 0 and 1: the trainer adds special tokens first, in order
DEFAULT_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer.json"


def new_tokenizer() -> Tokenizer:
    """An empty byte-level BPE pipeline (GPT-2 style, no prefix space so text is never changed)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    text_files: list[Path], vocab_size: int = 8192, out_path: Path | None = None
) -> Tokenizer:
    """Train byte-level BPE on .txt / .txt.xz files, streamed so memory stays bounded.

    The text is fed in paragraph pieces (`train_from_iterator`), never read whole. When
    `out_path` is given the JSON is written to a temp file and renamed into place.
    """
    n_min = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_min:
        raise PerseusError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {n_min}")
    files = [Path(f) for f in text_files]
    for f in files:
        if not f.is_file():
            raise PerseusError(f"missing data file: {f}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )

    def pieces():
        for f in files:
            yield from iter_paragraph_chunks(f)

    tok.train_from_iterator(pieces(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}"
    if out_path is not None:
        save_tokenizer(tok, out_path)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write tokenizer.json atomically (temp file + rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        raise PerseusError(f"cannot write {path}: {e.strerror}") from None
    return path


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load tokenizer.json (default: the one shipped in perseus_edge/assets)."""
    path = Path(path) if path is not None else DEFAULT_TOKENIZER
    if not path.is_file():
        raise PerseusError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a plain Exception with a serde message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PerseusError(f"cannot parse tokenizer file {path}: {reason}") from None


def check_vocab(
    tokenizer: Tokenizer, vocab_size: int, where: str, name: str = "tokenizer.json"
) -> None:
    """Refuse a tokenizer whose size differs from the model's: ids would index the wrong rows."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n != vocab_size:
        raise PerseusError(f"{name} has {n} tokens but {where}'s vocab_size is {vocab_size}")


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`, with no BOS/EOS added (the pipeline has no post-processor anyway)."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer: Tokenizer, ids) -> str:
    """Decode keeping special tokens, so decode(encode(s)) == s even if s contains them."""
    return tokenizer.decode(list(ids), skip_special_tokens=False)
