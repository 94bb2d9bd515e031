"""Corpus access: find the data, tokenize each split once into a uint16 file, sample batches.

Only numpy is imported at module level; torch is imported inside `TokenWindows.torch_batch`, so
the tokenizer and data tools run on machines without torch.

The token cache is a flat array of uint16 ids on disk, read back with `np.memmap`: 100M tokens
cost 200 MB of disk and no RAM, and every training process maps the same file.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from perseus_edge.atomic import describe_oserror, fault, remove_stale_temp_files
from perseus_edge.errors import PerseusError

SPLITS = ("train", "valid", "test")
REPO = Path(__file__).resolve().parent.parent  # folder holding the perseus_edge package
CHUNK_CHARS = 1 << 22  # ~4M characters per read: bounded memory, big enough batches
# A split point sits just before a "\n\n" that follows a non-space character. Byte-level BPE
# pre-tokenization always cuts between a non-space and a space, so encoding the pieces one by one
# gives exactly the ids of encoding the whole text at once (no word and no space run is cut).
_PARAGRAPH_SPLIT = re.compile(r"(?<=\S)(?=\n\n)")
_WORD_SPLIT = re.compile(r"(?<=\S)(?=[ \t\n\r])")  # same guarantee, only for huge paragraphs


# ---------------------------------------------------------------------------------------------
# finding the data


BUNDLED_DATA = REPO / "data" / "sample"  # committed: the valid and test splits, a train sample
DATA_HINT = "set --data-dir or PERSEUS_DATA_DIR to a folder holding train/valid/test.txt.xz"


def _default_data_dirs() -> list[Path]:
    """Fallback locations: a git-ignored full copy inside the repo (GPU machine), the shared one
    beside the checkout, then the sample committed with the repository."""
    return [REPO / "data" / "gutenberg", REPO.parent / "shared" / "data" / "gutenberg", BUNDLED_DATA]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Explicit argument, else $PERSEUS_DATA_DIR, else the first default folder that exists."""
    explicit = data_dir if data_dir is not None else os.environ.get("PERSEUS_DATA_DIR") or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise PerseusError(f"data folder not found: {path} ({DATA_HINT})")
        return path
    candidates = _default_data_dirs()
    for path in candidates:
        if path.is_dir():
            return path
    raise PerseusError(f"data folder not found: tried {', '.join(map(str, candidates))} ({DATA_HINT})")


def is_bundled_sample(data_dir: str | Path) -> bool:
    """Whether `data_dir` is the committed sample, whose train split is only ~400k characters."""
    try:
        return Path(data_dir).resolve() == BUNDLED_DATA.resolve()
    except OSError:
        return False


def token_cache_dir() -> Path:
    """Where tokenized splits are cached: $PERSEUS_CACHE, else $XDG_CACHE_HOME/perseus-edge/tokens
    (~/.cache when unset)."""
    if os.environ.get("PERSEUS_CACHE"):
        return Path(os.environ["PERSEUS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "perseus-edge" / "tokens"


def split_file(data_dir: str | Path, split: str) -> Path:
    """The file of one split: `{split}.txt.xz`, or a plain `{split}.txt`."""
    if split not in SPLITS:
        raise PerseusError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    xz, plain = data_dir / f"{split}.txt.xz", data_dir / f"{split}.txt"
    if xz.is_file():
        return xz
    if plain.is_file():
        return plain
    raise PerseusError(f"missing data file: {xz}")


# ---------------------------------------------------------------------------------------------
# streaming text


def _open_raw(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise PerseusError(f"cannot read {path}: {e.strerror}") from None


def iter_paragraph_chunks(
    path: str | Path,
    chunk_chars: int = CHUNK_CHARS,
    max_chars: int | None = None,
    raw_file=None,
) -> Iterator[list[str]]:
    """Stream a .txt or .txt.xz file as lists of pieces cut at paragraph boundaries.

    Concatenating every piece of every list gives back the file's text exactly (the first
    `max_chars` characters of it when given; that prefix may end mid-word). Memory stays around
    `chunk_chars`, whatever the file size. `raw_file` lets a caller watch the on-disk position.
    """
    path = Path(path)
    own_raw = raw_file is None
    raw = _open_raw(path) if own_raw else raw_file
    # newline="" keeps the text byte-exact: no "\r\n" translation behind our back.
    if path.suffix == ".xz":
        text_file = lzma.open(raw, "rt", encoding="utf-8", newline="")
    else:
        text_file = io.TextIOWrapper(raw, encoding="utf-8", newline="")
    left = max_chars
    carry = ""
    try:
        with text_file:
            while True:
                want = chunk_chars if left is None else min(chunk_chars, left)
                block = text_file.read(want) if want > 0 else ""
                if left is not None:
                    left -= len(block)
                buf = carry + block
                if not block:  # end of file (or of the prefix): flush everything
                    if buf:
                        yield _PARAGRAPH_SPLIT.split(buf)
                    return
                # hold back the last piece: its paragraph may go on in the next block
                pieces = _PARAGRAPH_SPLIT.split(buf)
                carry = pieces.pop()
                if len(carry) > 4 * chunk_chars:  # no paragraph break for ages: cut at a space
                    more = _WORD_SPLIT.split(carry)
                    carry = more.pop()
                    pieces += more
                if pieces:
                    yield pieces
    except (UnicodeDecodeError, lzma.LZMAError, EOFError) as e:
        raise PerseusError(f"cannot read {path}: {e}") from None
    finally:
        if own_raw:
            raw.close()


# ---------------------------------------------------------------------------------------------
# tokenizing a split once


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's JSON: names the cache so a new tokenizer never reads stale ids."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def cache_path(tokenizer, split: str, cache_dir: str | Path, max_chars: int | None = None,
               src: Path | None = None) -> Path:
    """`{split}.{tokenizer}.{source}[.first{max_chars}].u16.bin`: a new tokenizer or another
    source file (path, size, mtime) gets its own cache, never stale ids."""
    prefix = "" if max_chars is None else f".first{max_chars}"
    source = ""
    if src is not None:
        st = Path(src).stat()
        key = f"{Path(src).resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
        source = "." + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return Path(cache_dir) / f"{split}.{tokenizer_hash(tokenizer)[:12]}{source}{prefix}.u16.bin"


# A cache file is this header, then the ids: a truncated or foreign file is caught, never used.
CACHE_MAGIC = b"PTOK\x01\x00\x00\x00"
HEADER_BYTES = 16  # magic (8) + token count (uint64 little-endian)


def _write_tokens(tokenizer, src: Path, out: Path, max_chars: int | None, progress: bool) -> int:
    """Tokenize `src` into `out` (header + raw uint16); return the number of tokens written."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    raw = _open_raw(src)
    disk_bytes = src.stat().st_size
    # The bar follows the on-disk position (the only size known before decompressing), and
    # the text column counts characters read.
    columns = (
        TextColumn(f"tokenizing {src.name}"),
        BarColumn(),
        TextColumn("{task.fields[chars]:,} chars, {task.fields[tokens]:,} tokens"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    n_chars = n_tokens = 0
    console = Console(stderr=True)  # keep stdout clean for whatever the CLI prints
    with raw, Progress(*columns, console=console, disable=not progress) as bar, open(out, "wb") as f:
        f.write(CACHE_MAGIC + (0).to_bytes(8, "little"))
        task = bar.add_task("tok", total=disk_bytes if max_chars is None else max_chars,
                            chars=0, tokens=0)
        for pieces in iter_paragraph_chunks(src, max_chars=max_chars, raw_file=raw):
            encodings = encode(pieces, add_special_tokens=False)
            ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.uint16)
            f.write(ids.tobytes())
            fault("tokens.write", out.name)
            n_chars += sum(len(p) for p in pieces)
            n_tokens += len(ids)
            done = n_chars if max_chars is not None else raw.tell()
            bar.update(task, completed=done, chars=n_chars, tokens=n_tokens)
        if max_chars is None:
            bar.update(task, completed=disk_bytes)
        f.seek(len(CACHE_MAGIC))
        f.write(n_tokens.to_bytes(8, "little"))
        f.flush()
        os.fsync(f.fileno())
    return n_tokens


def _open_cache(path: Path) -> np.memmap | None:
    """The ids of a cache file, or None when it is damaged (truncated, foreign, half-written)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError:
        return None
    if len(head) < HEADER_BYTES or head[:8] != CACHE_MAGIC:
        return None
    n = int.from_bytes(head[8:], "little")
    if n == 0 or size != HEADER_BYTES + 2 * n:
        return None
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n,))


def tokenize_split(
    tokenizer,
    data_dir: str | Path | None,
    split: str,
    cache_dir: str | Path,
    max_chars: int | None = None,
    progress: bool = True,
) -> np.memmap:
    """Token ids of a split as a read-only uint16 memmap, tokenizing at most once per tokenizer
    and source file.

    The cache file (`cache_path`) is written to a temp file and renamed, so an interrupted run
    never leaves a truncated cache; a damaged one (size and header disagree) is rebuilt, with a note.
    """
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > 65536:  # ids 0..65535 fit in uint16
        raise PerseusError(f"tokenizer has {vocab} tokens: uint16 token files hold at most 65536")
    if max_chars is not None and max_chars <= 0:
        raise PerseusError(f"max_chars must be positive, got {max_chars}")
    src = split_file(resolve_data_dir(data_dir), split)
    path = cache_path(tokenizer, split, cache_dir, max_chars, src)
    if path.is_file():
        ids = _open_cache(path)
        if ids is not None:
            return ids
        print(f"note: token cache {path} is damaged (truncated or not a token file): tokenizing again",
              file=sys.stderr)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PerseusError(f"cannot create cache folder {path.parent}: {e.strerror}") from None
    remove_stale_temp_files(path.parent, f".{split}.*.tmp-*")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        n = _write_tokens(tokenizer, src, tmp, max_chars, progress)
        if n == 0:
            raise PerseusError(f"{src} holds no text")
        os.replace(tmp, path)
    except OSError as e:
        raise PerseusError(f"cannot write token cache {path}: {describe_oserror(e)} "
                           f"(set PERSEUS_CACHE to a folder with space)") from None
    finally:
        tmp.unlink(missing_ok=True)
    ids = _open_cache(path)
    if ids is None:
        raise PerseusError(f"token cache {path} changed while it was read: run again")
    return ids


# ---------------------------------------------------------------------------------------------
# batches


def _check_length(tokens: np.ndarray, seq_len: int) -> None:
    if seq_len < 1:
        raise PerseusError(f"seq_len must be at least 1, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise PerseusError(
            f"only {len(tokens)} tokens of data but seq_len {seq_len} needs at least {seq_len + 1}"
        )


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sequential non-overlapping windows from the start of `tokens`, for validation loss.

    Window i is x = tokens[i*seq_len : (i+1)*seq_len], y = x shifted by one. The same tokens are
    scored every time, so validation losses of different runs and steps compare. The last batch
    may hold fewer rows; the tail shorter than a window is dropped.
    """
    _check_length(tokens, seq_len)
    n_windows = (len(tokens) - 1) // seq_len
    n_batches = (n_windows + batch_size - 1) // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    steps = np.arange(seq_len + 1)
    for b in range(n_batches):
        starts = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows)) * seq_len
        buf = np.asarray(tokens[starts[:, None] + steps], dtype=np.int64)
        yield np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])


class TokenWindows:
    """Random contiguous windows of a token array, reproducible from (seed, step, rank).

    Each step draws batch_size * world_size offsets from `default_rng([seed, step])` (the global
    batch) and rank r keeps rows r, r+w, r+2w, ... So w processes with batch B train on exactly
    the batch that one process with batch B*w sees, and a resumed run sees the same data again.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_length(tokens, seq_len)
        if batch_size < 1:
            raise PerseusError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise PerseusError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise PerseusError(f"seed must be non-negative, got {seed}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def offsets(self, step: int) -> np.ndarray:
        """Start positions of this rank's rows at `step`."""
        rng = np.random.default_rng([self.seed, step])
        high = len(self.tokens) - self.seq_len  # exclusive: the last window's y ends at len-1
        every = rng.integers(0, high, size=self.batch_size * self.world_size)
        return every[self.rank :: self.world_size]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), int64 arrays [batch_size, seq_len]; y[:, t] is the token after x[:, t]."""
        starts = self.offsets(step)
        buf = np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)], dtype=np.int64)
        return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])

    def torch_batch(self, step: int, device="cpu"):
        """`batch(step)` as torch LongTensors on `device` (pinned, non-blocking copy to CUDA)."""
        import torch

        device = torch.device(device)
        x, y = (torch.from_numpy(a) for a in self.batch(step))
        if device.type == "cuda":
            return (
                x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True),
            )
        return x.to(device), y.to(device)

    def eval_batches(
        self,
        seq_len: int | None = None,
        batch_size: int | None = None,
        max_batches: int | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Module-level `eval_batches` on this array (defaults: this object's seq_len/batch_size)."""
        return eval_batches(
            self.tokens, seq_len or self.seq_len, batch_size or self.batch_size, max_batches
        )
