"""The export config section ([export])."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExportConfig:
    compressor: str = "zlib"  # zlib (official) | zstd | lzma | brotli | auto (smallest)
    # Default width of the large 2-D tensors: int8 is the official export (percentile clip);
    # int6 / int5 / int4 quantize per row with an fp16 scale.
    scheme: str = "int8"
    # [[regex, bits | "fp16" | "fp32"], ...] over parameter names, first match wins, e.g.
    # [["tok_emb", "fp16"], ["mlp", 5], ["attn", 6]]. On the command line: tok_emb:fp16,mlp:5
    policy: list = field(default_factory=list)
    # Keep the (tied) token embedding in fp16 instead of quantizing it: a tok_emb fp16 rule
    # placed before the policy's own rules.
    fp16_embedding: bool = False
    clip_search: str = "auto"  # auto: for intN, not the official int8 | on | off
    storage: str = "auto"  # packed | bytes | auto (smaller artifact)
    layout: str = "auto"  # plain | grouped | auto (smaller artifact)
    gptq: bool = False  # GPTQ with Hessians from training-data activations
    gptq_seqs: int = 128  # calibration sequences (train_seq_len tokens each)
    gptq_block: int = 128
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    # > 0: charge calibration + GPTQ to the wall-clock budget: training stops this many
    # seconds early, and the run reports whether calibration + GPTQ fitted in them.
    gptq_reserve_seconds: float = 0.0
    # Let the allocator pick bits per tensor (8/6/5/4) to fit allocate_budget model bytes
    # (0: 16,000,000 minus the code bytes), minimising Hessian-weighted quantization error.
    allocate: bool = False
    allocate_budget: int = 0
