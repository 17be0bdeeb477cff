"""Data provenance and the independent byte recount: validation documents found in training
shards wherever they sit (across shard boundaries too), the expected validation size of a named
dataset variant, and the decoded-text byte count agreeing with the byte tables to the byte (on
the official sp1024 tokenizer's byte-fallback pieces too, cut anywhere)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from pgolf.data.build import tokenize_to_shards
from pgolf.data.build import OFFICIAL_VAL_DOCS
from pgolf.data.provenance import expected_val_docs, split_documents, val_train_overlaps
from pgolf.data.shards import read_shard, resolve_shards, write_shard
from pgolf.data.synthetic import write_synthetic_corpus
from pgolf.data.text_bytes import TextBytes, sidecar_val_bytes, text_bytes_upto
from pgolf.data.tokenizer import ByteTokenizer, load_tokenizer

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fineweb_sp1024_sample"
DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (3 + i % 5) for i in range(40)]


def shards(folder: Path, split: str) -> list[Path]:
    return resolve_shards(str(folder / f"fineweb_{split}_*.bin"))


def test_split_documents_at_bos():
    tokens = np.array([1, 5, 6, 1, 7, 1, 1, 8, 9])
    assert split_documents(tokens, 1) == [(1, 3), (4, 5), (6, 6), (7, 9)]


def test_clean_split_has_no_overlap(tmp_path):
    tokenize_to_shards(DOCS, ByteTokenizer(), tmp_path, num_val_docs=10, shard_tokens=500)
    report = val_train_overlaps(shards(tmp_path, "val"), shards(tmp_path, "train"), ByteTokenizer.bos_id)
    assert (report.val_docs, report.train_docs, report.overlaps) == (10, 30, [])


def test_a_preparation_script_that_puts_val_documents_into_train_is_caught(tmp_path):
    """The validation documents written again among the training documents (as a script whose
    default split included them did), with shards so small that documents straddle them."""
    leaked = DOCS[:10] + DOCS[10:20] + [DOCS[3], DOCS[7]] + DOCS[20:]
    tokenize_to_shards(leaked, ByteTokenizer(), tmp_path, num_val_docs=10, shard_tokens=300)
    train = shards(tmp_path, "train")
    assert len(train) > 5
    report = val_train_overlaps(shards(tmp_path, "val"), train, ByteTokenizer.bos_id)
    assert sorted(o.val_doc for o in report.overlaps) == [3, 7]
    # Each found copy is where it was written: its BOS at that offset, its text after it.
    for o in report.overlaps:
        tokens = np.concatenate([read_shard(p) for p in train[[p.name for p in train].index(o.train_file):]])
        assert tokens[o.offset] == ByteTokenizer.bos_id
        assert bytes((tokens[o.offset + 1: o.offset + 1 + o.tokens] - 4).astype(np.uint8)) == DOCS[o.val_doc].encode()


def test_a_val_document_copied_into_a_train_shard_is_caught(tmp_path):
    write_synthetic_corpus(tmp_path, train_tokens=20_000, val_tokens=3_000, seed=0, doc_bytes=500)
    val, train = tmp_path / "synthetic_val_000000.bin", tmp_path / "synthetic_train_000000.bin"
    report = val_train_overlaps([val], [train], 1)
    assert report.overlaps == [] and report.val_docs == 6
    v, t = read_shard(val), read_shard(train)
    doc = v[501 * 2: 501 * 3]  # the third validation document, with its BOS
    write_shard(train, np.concatenate([t[:5010], doc, t[5010:]]), overwrite=True)
    (found,) = val_train_overlaps([val], [train], 1).overlaps
    assert (found.val_doc, found.tokens, found.train_file, found.offset) == (2, 500, train.name, 5010)


def test_short_identical_documents_are_reported_apart(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 10, 11, 1, *range(20, 60)])
    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 10, 11, 1, 5, 6])
    report = val_train_overlaps(shards(tmp_path, "val"), shards(tmp_path, "train"), 1)
    assert report.overlaps == [] and [(o.val_doc, o.tokens) for o in report.short] == [(0, 2)]


def test_expected_val_docs(tmp_path):
    assert expected_val_docs(tmp_path) is None
    official = tmp_path / "fineweb10B_sp1024"
    official.mkdir()
    assert expected_val_docs(official)[0] == OFFICIAL_VAL_DOCS == 50_000
    caseops = tmp_path / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"  # the CaseOps export
    caseops.mkdir()
    assert expected_val_docs(caseops)[0] == 50_000
    meta = write_synthetic_corpus(tmp_path / "syn", train_tokens=5_000, val_tokens=2_000, seed=0, doc_bytes=300)
    assert expected_val_docs(tmp_path / "syn")[0] == meta["splits"]["val"]["docs"] == 7
    assert sidecar_val_bytes(tmp_path / "syn")[0] == meta["splits"]["val"]["bytes"]


# --- byte recount ---------------------------------------------------------------------------------------

def table_counts(tokens: np.ndarray, tokenizer, vocab: int) -> np.ndarray:
    """Cumulative bytes of targets 1..c by the byte tables (what the evaluation charges)."""
    luts = tokenizer.byte_luts(vocab)
    t = tokens.astype(np.int64)
    per = np.zeros(len(t), np.int64)
    per[1:] = luts.base_bytes[t[1:]].astype(np.int64) + (luts.has_leading_space[t[1:]] & ~luts.is_boundary[t[:-1]])
    return np.cumsum(per)


def test_decoded_bytes_of_the_synthetic_corpus(tmp_path):
    meta = write_synthetic_corpus(tmp_path, train_tokens=5_000, val_tokens=3_000, seed=0, doc_bytes=400)
    tokens = read_shard(tmp_path / "synthetic_val_000000.bin")
    counter = TextBytes(tokens, ByteTokenizer())
    cum = table_counts(tokens, ByteTokenizer(), 260)
    assert counter.upto(len(tokens) - 1) == meta["splits"]["val"]["bytes"] == cum[-1]
    assert all(counter.upto(c) == cum[c] for c in (0, 1, 400, 401, 402, 1234, 2999))
    assert counter.documents == 8


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared FineWeb sample not present")
def test_decoded_bytes_of_fineweb_equal_the_byte_tables_at_any_cut():
    """sp1024 with byte fallback: whole documents and cuts anywhere (inside a character's
    byte pieces too) decode to the bytes the tables charge; the whole split is the README's
    960,879 bytes."""
    tok = load_tokenizer(SAMPLE / "fineweb_1024_bpe.model")
    tokens = read_shard(SAMPLE / "fineweb_val_000000.bin")
    cum = table_counts(tokens, tok, 1024)
    counter = TextBytes(tokens, tok)
    assert counter.upto(len(tokens) - 1) == cum[-1] == 960_879 and counter.documents == 300
    is_byte = np.array([tok.sp.is_byte(int(i)) for i in range(1024)])
    inside = [c for c in range(1, len(tokens) - 1) if is_byte[tokens[c]] and is_byte[tokens[c + 1]]]
    rng = random.Random(0)
    cuts = rng.sample(range(1, len(tokens)), 500) + rng.sample(inside, 50)
    assert text_bytes_upto(tokens, tok, cuts) == {c: int(cum[c]) for c in cuts}
    # A stream that starts inside a document (no BOS first) counts its first word's space.
    tail = tokens[7:]
    assert TextBytes(tail, tok).upto(len(tail) - 1) == cum[-1] - cum[7]


def test_sidecar_absent_or_unreadable(tmp_path):
    assert sidecar_val_bytes(tmp_path) is None
    (tmp_path / "synthetic.json").write_text(json.dumps({"splits": {}}))
    assert sidecar_val_bytes(tmp_path) is None


