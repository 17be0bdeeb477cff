"""The bytes of the validation text, counted by decoding it: an independent recount of what the
evaluation charges through the tokenizer's byte tables (pgolf.data.tokenizer.ByteLUTs).

The score is bits per byte of the text, so the byte count is half of it: a table that charges a
byte-fallback token 3 bytes, or a leading space after BOS, moves every val_bpb. Here the stream
is split into documents at BOS, each document's tokens are decoded back to text by the
tokenizer itself, and the UTF-8 length of that text is the count: no byte table is read.
`text_bytes_upto` gives the bytes of targets 1..c for any cut c (a receipt's range ends), a cut
inside a document decoding that document's prefix. A data set that states its byte total in a
sidecar file (the synthetic corpus's synthetic.json) is checked against the decoded total.

Text a tokenizer cannot decode back to the original (CaseOps: case operators stand for no bytes)
ships per-token byte counts instead, in a byte sidecar beside each validation shard
(X_val_bytes_NNNNNN.bin, framed like a token shard); pgolf.data.shards.load_byte_sidecar reads them.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Iterable

import numpy as np



def _decoded_bytes(tokenizer, ids: np.ndarray) -> int:
    """UTF-8 length of the text the tokenizer decodes ids to (specials carry no text)."""
    if len(ids) == 0:
        return 0
    if hasattr(tokenizer, "decode_bytes"):  # byte260: the bytes themselves
        return len(tokenizer.decode_bytes(ids))
    return len(tokenizer.decode(ids).encode("utf-8"))


def _is_byte_piece(tokenizer):
    sp = getattr(tokenizer, "sp", None)
    return (lambda i: bool(sp.is_byte(int(i)))) if sp is not None else (lambda i: False)


class TextBytes:
    """Decoded byte counts of one token stream (targets are token indices 1..T)."""

    def __init__(self, tokens: np.ndarray, tokenizer):
        self.tokens = np.asarray(tokens)
        self.tokenizer = tokenizer
        self.is_byte = _is_byte_piece(tokenizer)
        bos = int(tokenizer.bos_id)
        starts = np.flatnonzero(self.tokens == bos)
        # Segments of text tokens [lo, hi): after each BOS, and before the first one when the
        # stream does not start with BOS (a document continued from before the stream).
        self.segments: list[tuple[int, int]] = []
        if len(self.tokens) > 1 and (len(starts) == 0 or starts[0] != 0):
            self.segments.append((1, int(starts[0]) if len(starts) else len(self.tokens)))
        for i, s in enumerate(starts):
            end = int(starts[i + 1]) if i + 1 < len(starts) else len(self.tokens)
            self.segments.append((int(s) + 1, end))
        self._lows = [lo for lo, _ in self.segments]
        self._full: list[int] | None = None  # cumulative bytes of whole segments

    @property
    def documents(self) -> int:
        return int(np.count_nonzero(self.tokens == int(self.tokenizer.bos_id)))

    def _segment_bytes(self, lo: int, hi: int) -> int:
        ids = self.tokens[lo:hi]
        if lo == 1 and int(self.tokens[0]) != int(self.tokenizer.bos_id):  # continued: decode with the token before
            context = self.tokens[:1]
            joined = np.concatenate([context, ids])
            return _decoded_bytes(self.tokenizer, joined) - _decoded_bytes(self.tokenizer, context)
        return _decoded_bytes(self.tokenizer, ids)

    def _cumulative(self) -> list[int]:
        if self._full is None:
            total, self._full = 0, []
            for lo, hi in self.segments:
                total += self._segment_bytes(lo, hi)
                self._full.append(total)
        return self._full

    def upto(self, cut: int) -> int:
        """Bytes of the text of targets 1..cut (tokens[1..cut])."""
        if not 0 <= cut < len(self.tokens):
            raise ValueError(f"cut {cut} is outside the stream's targets 1..{len(self.tokens) - 1}")
        if cut == 0:
            return 0
        k = bisect.bisect_right(self._lows, cut) - 1  # the segment holding token `cut` (or the BOS after it)
        if k < 0:
            return 0
        lo, hi = self.segments[k]
        before = self._cumulative()[k - 1] if k > 0 else 0
        n = min(cut + 1, hi)  # tokens lo..n-1 are targets up to `cut`
        if n >= hi:
            return before + self._segment_bytes(lo, hi)
        # A cut inside a run of byte-fallback pieces splits a character: decode to the run's end,
        # less the bytes after the cut (one per byte piece).
        m = n
        if n > lo and self.is_byte(self.tokens[n - 1]) and self.is_byte(self.tokens[n]):
            while m < hi and self.is_byte(self.tokens[m]):
                m += 1
        return before + self._segment_bytes(lo, m) - (m - n)


def text_bytes_upto(tokens: np.ndarray, tokenizer, cuts: Iterable[int]) -> dict[int, int]:
    """For each cut c: the UTF-8 bytes of the decoded text of targets 1..c."""
    counter = TextBytes(tokens, tokenizer)
    return {c: counter.upto(c) for c in cuts}


def sidecar_val_bytes(data_dir: str | Path) -> tuple[int, str] | None:
    """(the validation split's byte total, where it is stated) from a sidecar file in data_dir,
    or None when the data set has none (the synthetic corpus's synthetic.json has one)."""
    path = Path(data_dir) / "synthetic.json"
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["splits"]["val"]["bytes"]), str(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
