"""Data provenance: no validation document in the training shards, and a validation split of the
size its dataset variant promises.

Shards hold documents as [BOS] + tokens, back to back, cut by token count only (pgolf.data.shards).
Splitting at BOS recovers the documents; each is hashed (blake2b of its token ids), and every
training document, streamed shard after shard with a document cut by a shard boundary carried
over, is looked up among the validation hashes. A copy of a validation document in the training
data, as a data-preparation script whose default put the official validation documents into the
training shards produced, is found whatever shard and offset it sits at. Documents shorter than
MIN_DOC_TOKENS are matched too but reported apart: a short boilerplate text may legitimately
occur in both splits.

The expected document count: the official FineWeb export's validation split is its first 50,000
documents, for every tokenizer variant (fineweb10B_<variant>); the synthetic corpus states its own
in synthetic.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pgolf.data import build
from pgolf.data.shards import read_shard

MIN_DOC_TOKENS = 16  # shorter identical documents are reported, not counted as leaks


def _digest(ids: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype="<u2").tobytes(), digest_size=16).digest()


def split_documents(tokens: np.ndarray, bos_id: int) -> list[tuple[int, int]]:
    """(start, end) of each document's text tokens: after each BOS, up to the next one."""
    starts = np.flatnonzero(np.asarray(tokens) == bos_id)
    ends = np.append(starts[1:], len(tokens))
    return [(int(s) + 1, int(e)) for s, e in zip(starts, ends)]


@dataclass
class Overlap:
    val_doc: int  # index of the validation document
    tokens: int  # its length
    train_file: str
    offset: int  # where its BOS sits in that file


@dataclass
class OverlapReport:
    val_docs: int
    train_docs: int
    train_tokens: int
    overlaps: list[Overlap] = field(default_factory=list)  # documents of >= MIN_DOC_TOKENS tokens
    short: list[Overlap] = field(default_factory=list)  # shorter identical documents


def val_train_overlaps(val_files: Sequence[str | Path], train_files: Sequence[str | Path], bos_id: int,
                       min_tokens: int = MIN_DOC_TOKENS) -> OverlapReport:
    """Every training document identical (token for token) to a validation document."""
    val = np.concatenate([read_shard(f) for f in val_files]) if val_files else np.empty(0, np.uint16)
    index: dict[bytes, int] = {}
    docs = split_documents(val, bos_id)
    for i, (lo, hi) in enumerate(docs):
        if hi > lo:
            index.setdefault(_digest(val[lo:hi]), i)
    report = OverlapReport(len(docs), 0, 0)
    carry, carry_file, carry_offset = None, "", 0  # a document cut by the end of the previous shard

    def look(ids: np.ndarray, file: str, offset: int) -> None:
        report.train_docs += 1
        if len(ids) == 0:
            return
        i = index.get(_digest(ids))
        if i is not None:
            found = Overlap(i, len(ids), file, offset)
            (report.overlaps if len(ids) >= min_tokens else report.short).append(found)

    for path in train_files:
        tokens = read_shard(path, mmap=True)
        report.train_tokens += len(tokens)
        starts = np.flatnonzero(tokens == bos_id)
        first = int(starts[0]) if len(starts) else len(tokens)
        if carry is not None:
            carry = np.concatenate([carry, tokens[:first]])
            if len(starts):
                look(carry, carry_file, carry_offset)
                carry = None
        for k, s in enumerate(starts):
            s = int(s)
            if k + 1 < len(starts):
                look(tokens[s + 1: int(starts[k + 1])], Path(path).name, s)
            else:
                carry, carry_file, carry_offset = np.array(tokens[s + 1:]), Path(path).name, s
    if carry is not None:
        look(carry, carry_file, carry_offset)
    return report


def expected_val_docs(data_dir: str | Path) -> tuple[int, str] | None:
    """(documents the validation split must hold, why) for a named dataset variant, else None."""
    data_dir = Path(data_dir)
    sidecar = data_dir / "synthetic.json"
    if sidecar.is_file():
        try:
            return int(json.loads(sidecar.read_text(encoding="utf-8"))["splits"]["val"]["docs"]), str(sidecar)
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return build.expected_val_docs(None, data_dir.resolve())  # the rule shards are built by
