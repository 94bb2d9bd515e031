"""Tokenizer round trips, data location errors, the token cache and batch sampling."""

from __future__ import annotations

import lzma
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perseus_edge import data
from perseus_edge.data import (
    TokenWindows,
    eval_batches,
    iter_paragraph_chunks,
    resolve_data_dir,
    split_file,
    tokenize_split,
)
from perseus_edge.errors import PerseusError
from perseus_edge.tokenizer import (
    EOS,
    SPECIAL_TOKENS,
    check_vocab,
    decode,
    encode,
    load_tokenizer,
    train_tokenizer,
)

N_CHARS = 300_000

MY_TEXT = (
    "Once upon a time, a small robot named Pip lived in a lighthouse.\n"
    "Every night Pip counted ships: one, two, 3, 4... 1000!\n\n"
    "“Don't be afraid,” said the keeper — naïve café crème, 東京, 🤖🌊.\n\n\n"
    "  Indented line\twith a tab.\n"
) * 200


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, data_dir) -> Path:
    """A data folder: the first 300k chars of the valid split as valid.txt.xz, plus MY_TEXT."""
    folder = tmp_path_factory.mktemp("gutenberg")
    valid = lzma.open(data_dir / "valid.txt.xz", "rt", encoding="utf-8", newline="").read(N_CHARS)
    with lzma.open(folder / "valid.txt.xz", "wt", encoding="utf-8", newline="") as f:
        f.write(valid)
    (folder / "train.txt").write_text(MY_TEXT, encoding="utf-8", newline="")
    return folder


@pytest.fixture(scope="session")
def tok(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer([corpus / "valid.txt.xz", corpus / "train.txt"], 512, out), out


def valid_text(corpus) -> str:
    return lzma.open(corpus / "valid.txt.xz", "rt", encoding="utf-8", newline="").read()


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_module_imports_without_torch():
    code = "import sys, perseus_edge.tokenizer, perseus_edge.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_special_tokens_and_size(tok):
    t, path = tok
    assert SPECIAL_TOKENS == ["<|endoftext|>", "<|pad|>"] and EOS == SPECIAL_TOKENS[0]
    assert t.token_to_id("<|endoftext|>") == 0 and t.token_to_id("<|pad|>") == 1
    assert t.get_vocab_size() == 512
    assert encode(t, EOS + "x")[0] == 0
    assert load_tokenizer(path).to_str() == t.to_str()


def random_strings(n: int) -> list[str]:
    rnd = random.Random(0)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rnd.randint(1, 40)):
            cp = rnd.choice([rnd.randint(0, 0x7F), rnd.randint(0x80, 0x2FFF), rnd.randint(0, 0x10FFFF)])
            if 0xD800 <= cp <= 0xDFFF:  # surrogates are not valid in UTF-8
                continue
            chars.append(chr(cp))
        out.append("".join(chars))
    return out


FIXED = [
    "",
    " ",
    "\n\n",
    "\n\n\n",
    "  leading spaces",
    "trailing spaces   ",
    "\ttab\r\nwindows\rcr",
    "emoji 🤖🌊👩‍👩‍👧‍👦 flags 🇫🇷",
    "CJK 東京 日本語のテキスト 한국어",
    "combining e\u0301 a\u0308\u0323 Z\u0336\u0335",
    "control \x00\x01\x07\x1b[31m\x7f\x85 chars",
    "zero width \u200b\u200d\ufeff bidi \u202e",
    "Ελληνικά, русский, العربية, עברית, हिन्दी",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ",
    "<|endoftext|> and <|pad|> inside text",
    "<|endoftext",
]


def test_unicode_round_trip(tok):
    t, _ = tok
    for s in FIXED + random_strings(500):
        ids = encode(t, s)
        assert decode(t, ids) == s, repr(s)


def test_check_vocab(tok):
    t, _ = tok
    check_vocab(t, 512, "the checkpoint")
    with pytest.raises(PerseusError, match=r"^tokenizer.json has 512 tokens but the checkpoint's vocab_size is 4096$"):
        check_vocab(t, 4096, "the checkpoint")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(PerseusError, match="not found.*nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PerseusError, match="bad.json") as e:
        load_tokenizer(bad)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# finding data


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PERSEUS_DATA_DIR", raising=False)
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("PERSEUS_DATA_DIR", str(other))
    assert resolve_data_dir(None) == other
    assert resolve_data_dir(tmp_path) == tmp_path  # the explicit argument wins
    monkeypatch.setenv("PERSEUS_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(PerseusError, match=r"data folder not found: .*gone \(set --data-dir or PERSEUS_DATA_DIR to a folder"):
        resolve_data_dir(None)
    with pytest.raises(PerseusError, match="data folder not found"):
        resolve_data_dir(tmp_path / "missing")
    monkeypatch.delenv("PERSEUS_DATA_DIR")
    monkeypatch.setattr(data, "_default_data_dirs", lambda: [tmp_path / "a", other])
    assert resolve_data_dir(None) == other
    monkeypatch.setattr(data, "_default_data_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(PerseusError, match="data folder not found"):
        resolve_data_dir(None)


def test_split_file(corpus, tmp_path):
    assert split_file(corpus, "valid") == corpus / "valid.txt.xz"
    assert split_file(corpus, "train") == corpus / "train.txt"
    with pytest.raises(PerseusError, match=r"^missing data file: .*test\.txt\.xz$"):
        split_file(corpus, "test")
    with pytest.raises(PerseusError, match="unknown split 'dev'"):
        split_file(corpus, "dev")


# ---------------------------------------------------------------------------------------------
# streaming and the token cache


def test_paragraph_chunks_rebuild_text(corpus):
    text = valid_text(corpus)
    chunks = list(iter_paragraph_chunks(corpus / "valid.txt.xz", chunk_chars=10_000))
    assert len(chunks) > 10
    assert "".join("".join(c) for c in chunks) == text
    prefix = "".join("".join(c) for c in iter_paragraph_chunks(corpus / "valid.txt.xz", 7_000, 12_345))
    assert prefix == text[:12_345]


def test_chunked_encoding_equals_whole_encoding(tok, tmp_path):
    """Pieces are cut where byte-level BPE cuts anyway, also in odd whitespace and long lines."""
    t, _ = tok
    odd = "".join(random_strings(300)) + "a.\x1c\n\nb\xa0\n\n c \n\n\n\n d\u3000\n\n<|endoftext|>\n\n"
    one_line = "word " * 3000 + "x.\x1c y\u00a0 z"  # no blank line at all: falls back to spaces
    for i, text in enumerate([odd * 3, one_line]):
        path = tmp_path / f"t{i}.txt"
        path.write_text(text, encoding="utf-8", newline="")
        chunks = list(iter_paragraph_chunks(path, chunk_chars=500))
        pieces = [p for c in chunks for p in c]
        assert len(pieces) > 5 and "".join(pieces) == text
        assert [i for p in pieces for i in encode(t, p)] == encode(t, text)


def test_tokenize_split_cache(tok, corpus, tmp_path, monkeypatch):
    t, _ = tok
    text = valid_text(corpus)
    ids = tokenize_split(t, corpus, "valid", tmp_path, progress=False)
    assert ids.dtype == np.uint16
    files = list(tmp_path.glob("*.u16.bin"))
    assert len(files) == 1 and files[0].name.startswith("valid.")
    assert not list(tmp_path.glob(".*tmp*"))
    # chunked encoding gives exactly the ids of encoding the whole text at once
    assert ids.tolist() == encode(t, text)
    assert decode(t, ids) == text

    # second call reuses the file without tokenizing again
    mtime = files[0].stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("tokenized twice")

    monkeypatch.setattr(data, "_write_tokens", boom)
    again = tokenize_split(t, corpus, "valid", tmp_path, progress=False)
    assert files[0].stat().st_mtime_ns == mtime
    assert np.array_equal(again, ids)
    monkeypatch.undo()

    # a prefix gets its own cache file and decodes to the text prefix
    pre = tokenize_split(t, corpus, "valid", tmp_path, max_chars=5_000, progress=True)
    assert decode(t, pre) == text[:5_000]
    assert len(list(tmp_path.glob("*.u16.bin"))) == 2


def test_different_tokenizer_different_cache(tok, corpus, tmp_path):
    t, _ = tok
    t2 = train_tokenizer([corpus / "train.txt"], 300)
    a = tokenize_split(t, corpus, "train", tmp_path, progress=False)
    b = tokenize_split(t2, corpus, "train", tmp_path, progress=False)
    assert len(list(tmp_path.glob("train.*.u16.bin"))) == 2
    assert decode(t, a) == MY_TEXT and decode(t2, b) == MY_TEXT
    assert len(a) != len(b)


def test_tokenize_split_refuses_big_vocab(tok, corpus, tmp_path):
    class Huge:
        def get_vocab_size(self, with_added_tokens=True):
            return 70_000

    with pytest.raises(PerseusError, match="70000 tokens"):
        tokenize_split(Huge(), corpus, "valid", tmp_path)


# ---------------------------------------------------------------------------------------------
# batches


@pytest.fixture
def tokens():
    return np.arange(10_000, dtype=np.uint16)  # token i sits at position i: offsets are visible


def test_token_windows_shift_and_determinism(tokens):
    w = TokenWindows(tokens, seq_len=32, batch_size=8, seed=1)
    x, y = w.batch(5)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int64
    assert np.array_equal(y[:, :-1], x[:, 1:])
    assert np.array_equal(y, x + 1)  # contiguous windows of the arange
    assert np.array_equal(TokenWindows(tokens, 32, 8, seed=1).batch(5)[0], x)
    assert not np.array_equal(w.batch(6)[0], x)
    assert not np.array_equal(TokenWindows(tokens, 32, 8, seed=2).batch(5)[0], x)
    # windows stay inside the array, and the whole range gets used
    starts = np.concatenate([w.batch(s)[0][:, 0] for s in range(300)])
    assert starts.min() >= 0 and starts.max() + 32 <= len(tokens) - 1
    assert starts.min() < 100 and starts.max() > len(tokens) - 200


def test_token_windows_ranks_match_global_batch(tokens):
    world, b = 4, 3
    full_x, full_y = TokenWindows(tokens, 16, b * world, seed=7).batch(11)
    parts = [TokenWindows(tokens, 16, b, seed=7, rank=r, world_size=world).batch(11) for r in range(world)]
    for r, (x, y) in enumerate(parts):
        assert np.array_equal(x, full_x[r::world]) and np.array_equal(y, full_y[r::world])
    assert sorted(map(tuple, np.concatenate([p[0] for p in parts]))) == sorted(map(tuple, full_x))


def test_token_windows_torch_batch(tokens):
    torch = pytest.importorskip("torch")
    w = TokenWindows(tokens, 16, 4, seed=0)
    x, y = w.torch_batch(3, "cpu")
    assert x.dtype == torch.long and x.shape == (4, 16)
    assert np.array_equal(x.numpy(), w.batch(3)[0]) and np.array_equal(y.numpy(), w.batch(3)[1])


def test_token_windows_errors(tokens):
    with pytest.raises(PerseusError, match="only 10 tokens"):
        TokenWindows(tokens[:10], seq_len=10, batch_size=2, seed=0)
    TokenWindows(tokens[:11], seq_len=10, batch_size=2, seed=0).batch(0)  # just enough
    with pytest.raises(PerseusError, match="rank 2"):
        TokenWindows(tokens, 10, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(PerseusError):
        list(eval_batches(tokens[:5], 8, 2))


def test_eval_batches_cover_without_overlap(tokens):
    seq = 64
    batches = list(TokenWindows(tokens, seq, 4, seed=0).eval_batches(seq, 5))
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    n_windows = (len(tokens) - 1) // seq
    assert xs.shape == (n_windows, seq) and len(batches) == -(-n_windows // 5)
    assert np.array_equal(xs.ravel(), np.arange(n_windows * seq))  # sequential, no gap, no overlap
    assert np.array_equal(ys, xs + 1)
    assert [len(x) for x, _ in batches][-1] == n_windows % 5 or n_windows % 5 == 0
    assert len(list(eval_batches(tokens, seq, 5, max_batches=3))) == 3
    again = list(eval_batches(tokens, seq, 5))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))
