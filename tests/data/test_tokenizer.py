"""Byte accounting and tokenizers, pinned to the official definitions on real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf.data.tokenizer import (
    ByteLUTs,
    ByteTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    bits_per_byte,
    check_vocab,
    load_tokenizer,
    token_bytes,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fineweb_sp1024_sample"
MODEL = DATA / "fineweb_1024_bpe.model"
VAL = DATA / "fineweb_val_000000.bin"
DOCS = DATA / "docs_val.jsonl"

needs_data = pytest.mark.skipif(
    not (MODEL.is_file() and VAL.is_file() and DOCS.is_file()),
    reason=f"FineWeb sample not found at {DATA}",
)


def _read_shard(path: Path) -> np.ndarray:
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == 20240520 and header[1] == 1
    tokens = np.fromfile(path, dtype="<u2", offset=256 * 4)
    assert tokens.size == header[2]
    return tokens


@pytest.fixture(scope="module")
def sp_tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(MODEL)


@pytest.fixture(scope="module")
def val_tokens() -> np.ndarray:
    return _read_shard(VAL)


@pytest.fixture(scope="module")
def val_docs() -> list[str]:
    with open(DOCS, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _piece_bytes(sp, prev: int, tgt: int) -> int:
    """Independent per-pair byte count, straight from the piece strings."""
    if tgt >= sp.vocab_size():
        return 0
    piece = sp.id_to_piece(tgt)
    if sp.is_control(tgt) or sp.is_unknown(tgt) or sp.is_unused(tgt):
        return 0
    if sp.is_byte(tgt):  # "<0xAB>"
        return 1
    prev_is_text = prev < sp.vocab_size() and not (
        sp.is_control(prev) or sp.is_unknown(prev) or sp.is_unused(prev)
    )
    if piece.startswith("\u2581"):
        return len(piece[1:].encode("utf-8")) + (1 if prev_is_text else 0)
    return len(piece.encode("utf-8"))


# ----------------------------------------------------------------------------- 1. val shard


@needs_data
def test_val_shard_byte_count_matches_official_and_decoded_text(sp_tok, val_tokens, val_docs):
    assert val_tokens.size == 392_385
    luts = sp_tok.byte_luts(1024)
    total = luts.count_bytes(val_tokens[:-1], val_tokens[1:])
    assert total == 960_879

    # The same number is the UTF-8 length of the documents as the tokenizer decodes them.
    encoded = sp_tok.encode_batch(val_docs)
    flat = np.concatenate([np.array([sp_tok.bos_id] + ids, dtype=np.uint16) for ids in encoded])
    np.testing.assert_array_equal(flat, val_tokens)
    decoded = [sp_tok.decode(ids) for ids in encoded]
    assert sum(len(t.encode("utf-8")) for t in decoded) == 960_879
    # ... not the raw text: nmt_nfkc normalisation rewrites most documents.
    assert sum(len(t.encode("utf-8")) for t in val_docs) == 960_871
    assert sum(d != t for d, t in zip(decoded, val_docs)) == 291

    # Per document, too (each doc is preceded by BOS, whose dummy "▁" is not counted).
    starts = np.flatnonzero(val_tokens == sp_tok.bos_id)
    ends = list(starts[1:]) + [val_tokens.size]
    for s, e, text in list(zip(starts, ends, decoded))[:20]:
        doc = val_tokens[s:e]
        assert luts.count_bytes(doc[:-1], doc[1:]) == len(text.encode("utf-8"))


@needs_data
def test_torch_token_bytes_and_numpy_agree(sp_tok, val_tokens):
    luts = sp_tok.byte_luts(1024)
    t = torch.from_numpy(val_tokens.astype(np.int64))
    per_token = token_bytes(t[:-1], t[1:], luts.to_torch("cpu"))
    assert per_token.shape == (val_tokens.size - 1,)
    assert int(per_token.to(torch.float64).sum().item()) == 960_879
    assert luts.count_bytes(t[:-1], t[1:]) == 960_879


# ----------------------------------------------------------------------------- 2. bpb parity


@needs_data
def test_bits_per_byte_matches_independent_computation(sp_tok, val_tokens):
    gen = torch.Generator().manual_seed(1234)
    vocab = 1024
    n = 2000
    # Real token context plus some control/byte/unknown ids sprinkled in.
    ids = torch.from_numpy(val_tokens[: n + 1].astype(np.int64)).clone()
    ids[torch.randint(0, n + 1, (60,), generator=gen)] = torch.randint(0, 260, (60,), generator=gen)
    prev, tgt = ids[:-1], ids[1:]
    logits = torch.randn(n, vocab, generator=gen, dtype=torch.float32) * 3.0

    # Library path: torch cross-entropy sum + LUT byte count.
    loss_sum = F.cross_entropy(logits.double(), tgt, reduction="sum").item()
    nbytes = sp_tok.byte_luts(vocab).count_bytes(prev, tgt)
    got = bits_per_byte(loss_sum, n, nbytes)

    # Independent path: log-softmax by hand in float64, bytes by a loop over pieces.
    x = logits.double().numpy()
    m = x.max(axis=1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(n), tgt.numpy()].sum()
    ref_bytes = sum(_piece_bytes(sp_tok.sp, int(p), int(t)) for p, t in zip(prev, tgt))
    assert nbytes == ref_bytes
    want = (nll / math.log(2)) / ref_bytes
    assert got == pytest.approx(want, rel=1e-12)


def test_bits_per_byte_formula_and_errors():
    assert bits_per_byte(math.log(2) * 10, 10, 5) == pytest.approx(2.0, rel=1e-15)
    assert bits_per_byte(0.0, 3, 7) == 0.0
    with pytest.raises(ValueError, match="token_count"):
        bits_per_byte(1.0, 0, 5)
    with pytest.raises(ValueError, match="byte_count"):
        bits_per_byte(1.0, 5, 0)
    with pytest.raises(ValueError, match="not finite"):
        bits_per_byte(float("nan"), 5, 5)


# ----------------------------------------------------------------------------- 3. pieces


@needs_data
def test_lut_piece_classes(sp_tok):
    sp = sp_tok.sp
    luts = sp_tok.byte_luts()
    assert len(luts) == 1024
    for i in (0, 1, 2):  # pad, bos, eos: control
        assert sp.is_control(i) and luts.is_boundary[i] and luts.base_bytes[i] == 0
    assert sp.is_unknown(3) and luts.is_boundary[3] and luts.base_bytes[3] == 0
    byte_ids = [i for i in range(1024) if sp.is_byte(i)]
    assert len(byte_ids) == 256
    assert all(luts.base_bytes[i] == 1 and not luts.has_leading_space[i] for i in byte_ids)
    assert not luts.is_boundary[byte_ids].any()
    # A multi-byte UTF-8 character with no piece of its own goes through byte fallback.
    ids = sp_tok.encode("\u6f22")
    assert all(sp.is_byte(i) for i in ids) and len(ids) == 3
    assert luts.count_bytes([1, *ids[:-1]], ids) == 3
    # Padding up to a larger model vocabulary: boundary, 0 bytes.
    padded = sp_tok.byte_luts(1100)
    assert len(padded) == 1100
    assert padded.is_boundary[1024:].all() and (padded.base_bytes[1024:] == 0).all()
    np.testing.assert_array_equal(padded.base_bytes[:1024], luts.base_bytes)


@needs_data
def test_leading_space_after_bos_is_not_counted(sp_tok):
    luts = sp_tok.byte_luts()
    # This model has no dummy prefix ("hello world" -> he ll o ▁wor ld), so build the
    # "▁word right after BOS" case by hand: the space is not charged after a boundary.
    ids = sp_tok.encode("hello world")
    assert [sp_tok.sp.id_to_piece(i) for i in ids] == ["he", "ll", "o", "\u2581wor", "ld"]
    wor = ids[3]
    assert luts.has_leading_space[wor] and luts.base_bytes[wor] == 3
    assert luts.count_bytes([ids[2]], [wor]) == 4  # after text: " wor"
    assert luts.count_bytes([sp_tok.bos_id], [wor]) == 3  # after BOS: "wor"
    assert luts.count_bytes([3], [wor]) == 3  # after <unk> (also a boundary)
    seq = np.array([sp_tok.bos_id, *ids])
    assert luts.count_bytes(seq[:-1], seq[1:]) == len("hello world")
    seq = np.array([sp_tok.bos_id, *ids[3:]])
    assert luts.count_bytes(seq[:-1], seq[1:]) == len(sp_tok.decode(ids[3:]).encode("utf-8")) == 5
    assert luts.count_bytes([], []) == 0


def test_byte_tokenizer_round_trip_and_luts():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.name, tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (260, "byte260", 0, 1, 2, 3)
    text = "héllo, wörld ✓\n"
    ids = tok.encode(text)
    assert ids == [b + 4 for b in text.encode("utf-8")]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.encode_batch(["a", "bc"]) == [[101], [102, 103]]
    assert tok.encode(b"\x00\xff") == [4, 259]
    with pytest.raises(TokenizerError):
        tok.decode([260])

    luts = tok.byte_luts()
    assert len(luts) == 260
    assert (luts.base_bytes[:4] == 0).all() and luts.is_boundary[:4].all()
    assert (luts.base_bytes[4:] == 1).all() and not luts.is_boundary[4:].any()
    assert not luts.has_leading_space.any()
    seq = np.array([tok.bos_id, *ids, tok.bos_id, *ids])
    assert luts.count_bytes(seq[:-1], seq[1:]) == 2 * len(text.encode("utf-8"))
    assert len(tok.byte_luts(300)) == 300 and tok.byte_luts(300).is_boundary[260:].all()
    assert luts.to_torch("cpu")[0].dtype == torch.int16


def test_load_tokenizer_and_errors(tmp_path):
    assert isinstance(load_tokenizer("byte260"), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    missing = tmp_path / "nope.model"
    with pytest.raises(TokenizerError, match="tokenizer not found at .*nope.model.*pgolf data fineweb.*data.tokenizer_path"):
        load_tokenizer(missing)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match=r"\.model"):
        load_tokenizer("gpt2")
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(None)


def test_check_vocab_message():
    tok = ByteTokenizer()
    check_vocab(tok, 260)
    with pytest.raises(TokenizerError) as err:
        check_vocab(tok, 1024)
    msg = str(err.value)
    assert "byte260 has vocabulary 260 but model.vocab_size=1024" in msg
    assert "set model.vocab_size=260 (VOCAB_SIZE=260)" in msg


@needs_data
def test_sentencepiece_basics(sp_tok):
    assert sp_tok.vocab_size == 1024 and sp_tok.bos_id == 1 and sp_tok.name == "fineweb_1024_bpe"
    assert isinstance(load_tokenizer(str(MODEL)), SentencePieceTokenizer)
    check_vocab(sp_tok, 1024)
    with pytest.raises(TokenizerError, match="VOCAB_SIZE=1024"):
        check_vocab(sp_tok, 260)
    assert sp_tok.decode(sp_tok.encode("The cat sat.")) == "The cat sat."


def test_count_bytes_rejects_out_of_range_ids():
    luts = ByteLUTs(np.ones(4, np.int16), np.zeros(4, bool), np.zeros(4, bool))
    with pytest.raises(TokenizerError, match="vocab_size"):
        luts.count_bytes([0], [7])


def test_check_bos_names_the_features_the_id_and_the_fix(sp_tok):
    from pgolf.data.tokenizer import ByteTokenizer, TokenizerError, check_bos

    check_bos(sp_tok, sp_tok.bos_id, "model.doc_mask")  # the official sp1024 tokenizer: BOS 1
    check_bos(ByteTokenizer(), 1, "model.doc_mask")
    with pytest.raises(TokenizerError, match=r"model.embed=smear_bos find documents by model.bos_id=3, but tokenizer "
                                             r"\S+ starts documents with id 1; set model.bos_id=1"):
        check_bos(sp_tok, 3, "model.embed=smear_bos")
