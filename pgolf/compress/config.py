"""The export config section ([export])."""

from __future__ import annotations

from dataclasses import dataclass, field

GPTQ_CALIBRATION = ("train_reserved", "self_generated", "train_after_budget")
# What export.group_backend may name (layout per_group): lrzip is the binary, the others the container's.
GROUP_BACKENDS = ("brotli", "lrzip", "lzma", "zstd", "zlib")


@dataclass
class ExportConfig:
    # zlib (official, level 9) | zstd (22) | lzma (preset 9 extreme) | lzma6 (preset 6, as PR #549)
    # | brotli (11) | auto (the smallest of zlib, zstd, lzma, brotli)
    compressor: str = "zlib"
    # Default width of the large 2-D tensors: int8 is the official export (percentile clip);
    # int6 / int5 / int4 quantize per row with an fp16 scale. Embedding tables and an untied
    # head stay official int8 under those (as the records), unless the policy or
    # fp16_embedding names them.
    scheme: str = "int8"
    # [[regex, bits | "fp16" | "fp32"], ...] over parameter names, first match wins, e.g.
    # [["tok_emb", "fp16"], ["mlp", 5], ["attn", 6]]. On the command line: tok_emb:fp16,mlp:5
    policy: list = field(default_factory=list)
    # Keep the (tied) token embedding in fp16 instead of quantizing it: a tok_emb fp16 rule
    # placed before the policy's own rules.
    fp16_embedding: bool = False
    clip_search: str = "auto"  # auto: for intN, not the official int8 | on | off
    # The search clip_search runs: row_search (each row's clip from 16 fractions of its max, by
    # row error) | percentile (PR #549: one of the 0.999 ... 0.99999, 1.0 quantiles of each row's
    # |w| for the whole tensor, by whole-tensor MSE; scale at least 1/qmax, the record's floor)
    # | sdclip (PR #1855: k * std(row) / qmax, k from the sdclip_k_* keys below, no search)
    clip_rule: str = "row_search"
    controls: str = "fp32"  # small control tensors: fp32 (official) | fp16 (as PR #549)
    storage: str = "auto"  # packed | bytes | auto (smaller artifact)
    layout: str = "auto"  # plain | grouped | auto (smaller artifact)
    # | per_group: PR #1855's per-group compression (pgolf.compress.grouping): the codes of each role
    # across layers (blocks.*.mlp.fc, tok_emb, ...) stored transposed and compressed alone with
    # group_backend (brotli | lrzip: `lrzip -z -L 9`, its binary on PATH | lzma | zstd | zlib), the
    # rest with compressor. row_order: the groups whose rows are put in greedy nearest-L1 order
    # first (the permutation is stored), e.g. ["tok_emb", "blocks.*.attn.c_q", "blocks.*.mlp.fc"].
    row_order: list = field(default_factory=list)
    group_backend: str = "brotli"
    gptq: bool = False  # GPTQ with Hessians from the activations of calibration sequences
    gptq_seqs: int = 128  # calibration sequences (train_seq_len tokens each)
    gptq_block: int = 128
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    # The calibration sequences of GPTQ and the allocator (GPTQ_CALIBRATION): train_reserved: the
    # training stream, read inside the wall-clock budget (training stops early) | self_generated:
    # sampled from the trained model (no data read; the 1.1147 record's) | train_after_budget: the
    # training stream after the budget, which records rule out (opt-in, non-record runs). The
    # summary's "calibration" says which, and whether training data was read past the budget.
    gptq_calibration: str = "train_reserved"
    # Seconds training stops before max_wallclock_seconds so the calibration fits in them (the
    # GPTQ solve reads no data and runs after); 0: none, or for train_reserved, measured before
    # training (pgolf.train.calibration).
    gptq_reserve_seconds: float = 0.0
    # Let the allocator pick bits per tensor (8/6/5/4) to fit allocate_budget model bytes
    # (0: 16,000,000 minus the code bytes), minimising Hessian-weighted quantization error.
    allocate: bool = False
    allocate_budget: int = 0
    # PR #1855's export (RECORDS B13, B14, B6); every switch off by default.
    # clip_rule="sdclip": each per-row intN scale is k * std(row) / qmax (no search), k by the
    # tensor's role: MLP, attention, embedding (tied or head), other matrices.
    sdclip_k_mlp: float = 11.5
    sdclip_k_attn: float = 13.0
    sdclip_k_embed: float = 14.0
    sdclip_k_other: float = 12.85
    # GPTQ (and the allocator) also get the tied embedding's Hessian, from the head's input (the
    # final RMSNorm's output), so GPTQ quantizes tok_emb too (e.g. int7 with policy tok_emb:7).
    gptq_embedding: bool = False
    # The attention output gates (model.attn_gate_dims) as per-row int8 (max|row| / 127), not fp16.
    attn_gate_int8: bool = False
    # LQER: a rank-lqer_rank correction (0: off) of the lqer_top matrices of largest quantization
    # error, A (rows x r) as int{lqer_a_bits} with one scale, B (r x cols) int{lqer_b_bits} with
    # one scale per lqer_b_group elements (pgolf.compress.lqer).
    lqer_rank: int = 0
    lqer_top: int = 3
    lqer_a_bits: int = 2
    lqer_b_bits: int = 4
    lqer_b_group: int = 64
