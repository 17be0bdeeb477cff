"""The model's config section ([model]); torch-free, so configs load without torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5
    # The model's slots (pgolf.model.registry); the defaults are the official baseline.
    attention: str = "gqa"  # attention module
    position: str = "rope"  # position encoding inside attention
    embed: list = field(default_factory=list)  # embedding add-ons, applied in order before the first norm
    stream: list = field(default_factory=list)  # stream add-ons: per-forward inputs handed to attention
    # Block layout: unet | recurrence | middle_cycle; auto: from model.recurrence and model.cycle_*
    layout: str = "auto"
    # MLP variant (pgolf.model.mlp.MLP_VARIANTS): relu2 (official) | leaky_relu2 | swiglu | gelu | silu
    mlp: str = "relu2"
    mlp_slope: float = 0.5  # leaky_relu2's negative slope
    # Hidden width; 0: mlp_mult x model_dim, or for swiglu 8/3 x model_dim rounded up to 64
    mlp_hidden: int = 0
    # Depth recurrence: every block runs this many times, the U-Net skips only on the last pass
    recurrence: int = 1
    # Middle cycle (all 0 = off): cycle_stem blocks, cycle_core blocks repeated cycle_repeats
    # times, cycle_tail blocks; skips go stem -> tail; num_layers = stem + core + tail.
    cycle_stem: int = 0
    cycle_core: int = 0
    cycle_repeats: int = 0
    cycle_tail: int = 0
