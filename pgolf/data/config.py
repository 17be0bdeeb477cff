"""The data config section ([data])."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    # "shards": official shard files under data_path; "synthetic": a generated order-2
    # Markov corpus with an exactly known entropy rate (no download needed).
    source: str = "shards"
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    train_pattern: str = "fineweb_train_*.bin"
    val_pattern: str = "fineweb_val_*.bin"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    synthetic_train_tokens: int = 2_000_000
    synthetic_val_tokens: int = 131_072
    synthetic_seed: int = 0
    # A background thread cuts the next batch into a reused pinned buffer while the GPU
    # computes: auto (on for CUDA) | on | off. Same batches, same order either way.
    prefetch: str = "auto"
    # Where val_bpb's bytes come from: auto (the byte sidecars beside the val shards when they
    # have them, else the tokenizer's byte tables) | on (sidecars required) | off (byte tables).
    byte_sidecar: str = "auto"
    # The shards hold CaseOps text (`pgolf data tokenize --caseops`, the 1.06108 record's data):
    # the tokenizer must carry the operators and the val bytes must come from the sidecars.
    caseops: bool = False
    # #1855's document-packing loader: each training step's chunk lies inside one shard, a shard
    # is read from its first model.bos_id token on and its tail too short for a step is skipped.
    doc_packing: bool = False
    # Each training micro-batch enters the model as one row of all its tokens, not rows of
    # train.train_seq_len: #1855's packed varlen row, where a document crossing a row boundary is
    # not cut there. Needs model.doc_mask (attention stays inside documents and max_span).
    packed_row: bool = False
