"""The benchmark's prompt: real text from the validation split, tokenized with the model's tokenizer.

Every backend and variant gets the same token ids (speed does not depend on the text, but the
trained model's routing does a little, and parity checks need real text). Without the data
folder, a fixed English paragraph repeated stands in.
"""

from __future__ import annotations

import lzma
from pathlib import Path

FALLBACK = ("Once upon a time, in a small village at the edge of a great forest, there lived an old "
            "clockmaker who repaired every clock in the valley and never told anyone his name. ")
OFFSET_CHARS = 20_000  # skip the file's header matter
TEXT_CHARS = 40_000  # ~10k tokens: more than any context we run


def prompt_text(chars: int = TEXT_CHARS) -> str:
    try:
        from perseus_edge.data import resolve_data_dir

        path = Path(resolve_data_dir(None)) / "valid.txt.xz"
        with lzma.open(path, "rt", encoding="utf-8") as f:
            text = f.read(OFFSET_CHARS + chars)[OFFSET_CHARS:]
        if len(text) > chars // 2:
            return text
    except Exception:  # noqa: BLE001 - no data folder: the fallback below
        pass
    return FALLBACK * (chars // len(FALLBACK) + 1)


def prompt_ids(tokenizer_path: str | Path, n_tokens: int) -> list[int]:
    """The first `n_tokens` ids of the prompt text (repeated if the text is too short)."""
    from perseus_edge.tokenizer import load_tokenizer

    ids = load_tokenizer(tokenizer_path).encode(prompt_text(), add_special_tokens=False).ids
    while len(ids) < n_tokens:
        ids = ids + ids
    return [int(i) for i in ids[:n_tokens]]
