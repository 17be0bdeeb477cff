"""val_bpb from a byte sidecar: without CaseOps it equals val_bpb from the tokenizer's byte tables
exactly (both count the documents' UTF-8 bytes), and with CaseOps it charges the original text's
bytes, not the transformed text's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.config import ModelConfig
from pgolf.data.build import tokenize_to_shards, train_tokenizer
from pgolf.data.shards import load_byte_sidecar, read_shard
from pgolf.data.tokenizer import SentencePieceTokenizer
from pgolf.eval.windows import score_windows, to_result, window_plan
from pgolf.model.gpt import GPT

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fineweb_sp1024_sample"
CPU = torch.device("cpu")
pytestmark = [pytest.mark.usefixtures("one_cpu_thread"),
              pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"FineWeb sample not found at {SAMPLE}")]


def docs(n: int) -> list[str]:
    with open(SAMPLE / "docs_val.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


def build(tmp_path: Path, caseops: bool, n_docs: int = 12):
    tok = SentencePieceTokenizer(train_tokenizer(SAMPLE / "docs_val.jsonl", tmp_path / "t.model", 400,
                                                 caseops=caseops, max_docs=100, threads=1))
    tokenize_to_shards(docs(n_docs), tok, tmp_path / "d", n_docs, caseops=caseops, byte_sidecar=True)
    tokens = torch.from_numpy(read_shard(tmp_path / "d" / "fineweb_val_000000.bin").astype(np.int64))
    sidecar = load_byte_sidecar(tmp_path / "d" / "fineweb_val_*.bin", tokens.numel())
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2))
    return tok, tokens, sidecar, model


def score(model, tokens, luts, seq_len=64, stride=32):
    windows = window_plan(tokens.numel() - 1, seq_len, stride)  # every target, whole documents
    return score_windows(model, tokens, windows, luts, CPU, batch_windows=16)


def test_sidecar_bpb_equals_byte_table_bpb_without_caseops(tmp_path):
    tok, tokens, sidecar, model = build(tmp_path, caseops=False)
    text_bytes = sum(len(d.encode("utf-8")) for d in docs(12))
    by_tables = score(model, tokens, tok.byte_luts().to_torch(CPU))
    by_sidecar = score(model, tokens, sidecar)
    assert by_tables.bytes == by_sidecar.bytes == text_bytes
    assert by_tables.loss_sum == by_sidecar.loss_sum and by_tables.tokens == by_sidecar.tokens
    assert to_result(by_sidecar).val_bpb == to_result(by_tables).val_bpb
    # Token by token the two agree too, except inside byte-fallback runs: the sidecar charges a
    # character split into byte pieces to its last piece (SentencePiece's surface), the tables 1 each.
    table = tok.byte_luts().count_bytes
    per_token = np.array([table(tokens[i - 1:i], tokens[i:i + 1]) for i in range(1, tokens.numel())])
    in_byte_piece = np.array([tok.sp.is_byte(int(t)) for t in tokens[1:]])
    assert (per_token == sidecar[1:].numpy())[~in_byte_piece].all()
    assert in_byte_piece.any()  # the sample has characters outside the tiny vocabulary


def test_caseops_bpb_charges_the_original_bytes(tmp_path):
    tok, tokens, sidecar, model = build(tmp_path, caseops=True)
    text_bytes = sum(len(d.encode("utf-8")) for d in docs(12))
    by_sidecar = score(model, tokens, sidecar)
    assert by_sidecar.bytes == text_bytes
    by_tables = score(model, tokens, tok.byte_luts().to_torch(CPU))  # what a CaseOps run must not report
    assert by_tables.loss_sum == by_sidecar.loss_sum and by_tables.bytes > text_bytes
    assert to_result(by_tables).val_bpb < to_result(by_sidecar).val_bpb
    # Sub-ranges (TTT chunks, receipts) add up to the whole.
    total = tokens.numel() - 1
    parts = [score_windows(model, tokens, window_plan(total, 64, 32, lo, hi), sidecar, CPU, 16)
             for lo, hi in ((0, 500), (500, 1234), (1234, total))]
    assert sum(p.bytes for p in parts) == text_bytes
