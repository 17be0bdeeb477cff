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
    post_norm: list = field(default_factory=list)  # post-norm add-ons, after the first norm (x0 is their output)
    stream: list = field(default_factory=list)  # stream add-ons: per-forward inputs handed to attention
    # Token-table add-ons (pgolf.model.embed), used only when switched on above:
    bigram_buckets: int = 1536  # embed=bigram: hash buckets, the last one for each row's first position
    bigram_dim: int = 128  # its table width (projected to model_dim unless equal)
    ve_dim: int = 128  # stream=value_embed: table width (projected to the K/V width unless equal)
    ve_layers: list[int] = field(default_factory=lambda: [-2, -1])  # its layers; negative: from the end
    # The records' attention, RoPE and block switches (pgolf.model.attention, gpt); off by default
    xsa_layers: list[int] = field(default_factory=list)  # exclusive self-attention in these layers
    rope_dims: int = 0  # rotate the first rope_dims dims of each head; 0: all
    rope_fp32: bool = False  # RoPE angles in fp32 even in a bf16 model (official: bf16 on CUDA)
    rope_ref_len: int = 0  # > 0: longer sequences scale the base by (len / ref)^(d / (d - 2)); 0: off
    ln_scale: bool = False  # block i scales its attention and MLP inputs by 1 / sqrt(i + 1)
    init: str = "default"  # default (official) | orthogonal (#549: orthogonal non-zero linears)
    # #1855's switches, off by default (pgolf.model.gpt, attention, embed, layout)
    skip_gates: bool = False  # each U-Net skip lerps into the stream by a learned sigmoid gate
    parallel_from: int = -1  # >= 0: decoder blocks from this one on run two residual lanes; -1: off
    attn_gate_dims: int = 0  # > 0: per-head output gate on attention, read from this many input dims
    attn_gate_scale: float = 0.5  # the gate's pre-sigmoid scale
    smear_dims: int = 12  # embed=smear_bos: dims of the token's embedding its gate reads
    bos_id: int = 1  # the token that starts a document (embed=smear_bos: nothing smears into it; doc_mask)
    doc_mask: bool = False  # attention never crosses a bos_id token (#1855's varlen attention)
    max_span: int = 0  # doc_mask: segments of at most this many positions inside a document (#1855: 2048); 0: no cap
    # Block layout: unet | recurrence | middle_cycle | loop; auto: from model.recurrence and model.cycle_*
    layout: str = "auto"
    # layout=loop: blocks loop_start..loop_end (inclusive) run loop_passes times in a row; the
    # loop is off (a plain U-Net) until loop_start_frac of training, on after it and in evaluation
    loop_start: int = 0
    loop_end: int = 0
    loop_passes: int = 1
    loop_start_frac: float = 0.0
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


def layer_set(layers: list[int], num_layers: int) -> frozenset[int]:
    """The blocks a layer-list key (model.xsa_layers, ...) names; negative indices count from the end."""
    return frozenset(i % num_layers for i in layers)


def layer_list_problems(cfg: ModelConfig, key: str) -> list[str]:
    layers, n = getattr(cfg, key), cfg.num_layers
    outside = [i for i in layers if not -n <= i < n]
    if outside:
        return [f"model.{key} lists layers {outside} that model.num_layers={n} does not have "
                f"(valid: 0..{n - 1}, or -{n}..-1 counting from the end)"]
    if len(layer_set(layers, n)) != len(layers):
        return [f"model.{key}={layers} names a layer twice (negative indices count from the end)"]
    return []
