"""Incremental detokenisation: token ids in, printable text out, correct UTF-8 at every step.

A byte-level BPE token is a run of *bytes*, not characters: an emoji (4 bytes) or a CJK character
(3 bytes) can be split over two or three tokens. Decoding each token alone would print U+FFFD
replacement characters. `TextStream` keeps the bytes of every token (a table built once from the
vocabulary) and feeds them to an incremental UTF-8 decoder, which holds back an incomplete
character until its last byte arrives. The concatenated pieces equal `tokenizer.decode(ids)`.

`StopFilter` sits after it: it holds back text that could be the start of a stop string, so a
stop string is never printed, even when it arrives split over several tokens.
"""

from __future__ import annotations

import codecs
import json
from typing import Sequence

from tokenizers import Tokenizer


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for the 256 bytes, inverted (char -> byte)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def token_bytes_table(tokenizer: Tokenizer) -> list[bytes] | None:
    """Raw bytes of every token id, or None when the tokenizer is not byte-level BPE."""
    spec = json.loads(tokenizer.to_str())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    dec = _byte_decoder()
    table: list[bytes] = []
    for i in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        tok = tokenizer.id_to_token(i)
        if tok is None:
            table.append(b"")
            continue
        # as the ByteLevel decoder does: mapped chars become their byte, others their UTF-8
        table.append(b"".join(bytes([dec[c]]) if c in dec else c.encode("utf-8") for c in tok))
    return table


class TextStream:
    """Feed token ids one at a time; get back the text that is now complete.

    >>> s = TextStream(tok); pieces = [s.push(i) for i in ids] + [s.flush()]
    >>> "".join(pieces) == tok.decode(ids)
    """

    def __init__(self, tokenizer: Tokenizer, table: list[bytes] | None = None):
        self.tokenizer = tokenizer
        self.table = table if table is not None else token_bytes_table(tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # only for tokenizers that are not byte-level
        self._emitted = 0

    def push(self, token_id: int) -> str:
        if self.table is not None:
            return self._utf8.decode(self.table[token_id] if 0 <= token_id < len(self.table) else b"")
        # generic path: re-decode, emit what grew, hold back a trailing replacement character
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        piece, self._emitted = text[self._emitted:], len(text)
        return piece

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD, as in a full decode)."""
        if self.table is not None:
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=False)
        piece, self._emitted = text[self._emitted:], len(text)
        return piece


class StopFilter:
    """Pass text through until a stop string appears; never print any part of a stop string.

    `push` returns the text that is safe to print now; `stopped` turns True once a stop string
    was seen (the text is cut just before it). `flush` releases the held-back tail at the end.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = 0  # longest tail of pending that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
