"""Attention ("gqa", the official) and its position encoding ("rope"), with #549's switches:
exclusive self-attention (model.xsa_layers) and partial, fp32 or length-rescaled RoPE; and
#1855's per-head output gate (model.attn_gate_dims) and document-masked attention (model.doc_mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.config import ModelConfig, layer_list_problems, layer_set
from pgolf.model.embed import VALUE_EMBED, value_embed_layers
from pgolf.model.layers import CastedLinear, rms_norm
from pgolf.model.registry import ATTENTIONS, POSITIONS
from pgolf.model.roles import Role, tag

try:  # CUDA's document-masked kernel (torch >= 2.5); without it CUDA takes the masked SDPA path
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    create_block_mask = flex_attention = None

DOC_MASK = "doc_mask"  # extras key: the forward's document mask (document_mask), with model.doc_mask


def inverse_frequencies(dims: int, base: float, device: torch.device | None = None) -> Tensor:
    return 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32, device=device) / dims))


class Rotary(nn.Module):
    """Rotary position encoding of the first `dims` channels of each head (0: all), tables
    cached per (length, device).

    Positions are built in inv_freq's dtype, as the official model does: on CUDA the model is
    cast to bf16, buffers included, so the baseline's angles are bf16 there. fp32=True builds
    them in fp32 whatever the buffers' dtype, and so does a length above ref_len (> 0), for
    which the base grows to base * (length / ref_len)^(dims / (dims - 2)), in training and
    evaluation alike (both #549)."""

    def __init__(self, head_dim: int, base: float, dims: int = 0, fp32: bool = False, ref_len: int = 0):
        super().__init__()
        self.dims, self.base, self.fp32, self.ref_len = dims or head_dim, base, fp32, ref_len
        self.register_buffer("inv_freq", inverse_frequencies(self.dims, base), persistent=False)
        self._cache: tuple[tuple, Tensor, Tensor] | None = None

    def base_at(self, seq_len: int) -> float:
        if self.ref_len and seq_len > self.ref_len:
            return self.base * (seq_len / self.ref_len) ** (self.dims / (self.dims - 2))
        return self.base

    def tables(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (seq_len, device, self.inv_freq.dtype)
        if self._cache is None or self._cache[0] != key:
            base = self.base_at(seq_len)
            inv_freq = (inverse_frequencies(self.dims, base, device) if self.fp32 or base != self.base
                        else self.inv_freq.to(device))
            positions = torch.arange(seq_len, device=device, dtype=inv_freq.dtype)
            angles = torch.outer(positions, inv_freq)
            self._cache = (key, angles.cos()[None, None], angles.sin()[None, None])
        _, cos, sin = self._cache
        return cos.to(dtype), sin.to(dtype)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.tables(q.size(-2), q.device, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Rotate (first half, second half) pairs of the first 2 x cos.size(-1) channels; the rest pass.
    rotated = 2 * cos.size(-1)
    if rotated < x.size(-1):
        return torch.cat((apply_rotary(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)
    x1, x2 = x[..., :rotated // 2], x[..., rotated // 2:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


@POSITIONS.register("rope")
def rope(cfg: ModelConfig, head_dim: int) -> Rotary:
    return Rotary(head_dim, cfg.rope_base, cfg.rope_dims, cfg.rope_fp32, cfg.rope_ref_len)


def exclude_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: each head's output minus its component along its own token's value direction.
    y (B, H, T, D), v (B, Hkv, T, D); head h reads KV head h // (H / Hkv), as SDPA's enable_gqa."""
    b, h, t, d = y.shape
    y = y.reshape(b, v.size(1), h // v.size(1), t, d)
    direction = F.normalize(v, dim=-1).unsqueeze(2)
    return (y - (y * direction).sum(-1, keepdim=True) * direction).reshape(b, h, t, d)


def document_segments(input_ids: Tensor, bos_id: int, max_span: int = 0) -> Tensor:
    """(B, T) segment index of each position, as #1855's cu_seqlens: a segment starts at each row's
    first position, at every bos_id token and, with max_span > 0, every max_span positions after
    a document's start (fixed segments, not a sliding window)."""
    pos = torch.arange(input_ids.size(1), device=input_ids.device)
    starts = input_ids == bos_id
    starts[:, 0] = True
    if max_span:
        doc_start = torch.where(starts, pos, 0).cummax(dim=1).values
        starts = starts | ((pos - doc_start) % max_span == 0)
    return starts.cumsum(dim=1)


def document_mask(input_ids: Tensor, bos_id: int, max_span: int = 0, flex: bool | None = None):
    """Causal attention within segments (document_segments), built once per forward: a flex
    BlockMask (flex None: on CUDA when flex_attention exists; not yet run on a GPU), else a
    boolean (B, 1, T, T) SDPA mask (True: may attend)."""
    seg = document_segments(input_ids, bos_id, max_span)
    batch, t = seg.shape
    if (input_ids.is_cuda and create_block_mask is not None) if flex is None else flex:
        def same_segment(b, h, q, k):
            return (seg[b, q] == seg[b, k]) & (k <= q)

        return create_block_mask(same_segment, batch, None, t, t, device=seg.device)
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


@ATTENTIONS.register("gqa")
class CausalSelfAttention(nn.Module):
    """Causal attention with grouped K/V heads (num_kv_heads <= num_heads), RMS-normed Q and K
    (so the learned per-head gain q_gain alone sets the logit scale), the `model.position`
    encoding, and a zero-initialised output projection. In the layers model.ve_layers it adds
    the value embedding (extras, pgolf.model.embed) times its own scalar to the values; in
    model.xsa_layers it removes each output's self-value component (exclude_self_value). With
    model.attn_gate_dims = k > 0, head h's output is then scaled by sigmoid(attn_gate_scale *
    gate[h] . x[:k]), from its own token's input x; the gate starts at 0 (a factor 1/2). With
    model.doc_mask, extras[DOC_MASK] (built by the GPT) keeps attention inside each document."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        kv_dim = cfg.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.c_k = CastedLinear(cfg.model_dim, kv_dim)
        self.c_v = CastedLinear(cfg.model_dim, kv_dim)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        tag(self, Role.CONTROL, "q_gain")
        self.position = POSITIONS.build(cfg.position, cfg, self.head_dim)
        self.xsa = layer in layer_set(cfg.xsa_layers, cfg.num_layers)
        self.ve_scale = None
        if layer in value_embed_layers(cfg):
            self.ve_scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float32))
            tag(self, Role.GATE, "ve_scale")
        self.gate = None
        if cfg.attn_gate_dims:
            self.gate_scale = cfg.attn_gate_scale
            self.gate = nn.Parameter(torch.zeros(cfg.num_heads, cfg.attn_gate_dims, dtype=torch.float32))
            tag(self, Role.GATE, "gate")

    def forward(self, x: Tensor, extras: dict[str, Tensor] | None = None) -> Tensor:
        batch, seq_len, dim = x.shape
        q = self.c_q(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x)
        if self.ve_scale is not None:
            v = v + self.ve_scale.to(v.dtype) * extras[VALUE_EMBED]
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.position(rms_norm(q), rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        gqa = self.num_kv_heads != self.num_heads
        mask = extras.get(DOC_MASK) if extras else None
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(mask, Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            y = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        if self.xsa:
            y = exclude_self_value(y, v)
        if self.gate is not None:
            g = F.linear(x[..., :self.gate.size(1)], self.gate.to(x.dtype))  # (B, T, heads)
            y = y * torch.sigmoid(self.gate_scale * g).transpose(1, 2)[..., None]
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, dim))


def attention_problems(cfg: ModelConfig) -> list[str]:
    """What is wrong with the attention and RoPE keys of cfg."""
    problems = layer_list_problems(cfg, "xsa_layers")
    if cfg.attn_gate_dims > cfg.model_dim:
        problems.append(f"model.attn_gate_dims must be at most model.model_dim={cfg.model_dim} (0: off), "
                        f"got {cfg.attn_gate_dims}")
    head_dim = cfg.model_dim // cfg.num_heads
    if cfg.rope_dims % 2 or cfg.rope_dims > head_dim:
        problems.append(f"model.rope_dims must be even and at most the head size model_dim / num_heads = {head_dim} "
                        f"(0: all of it), got {cfg.rope_dims}")
    elif cfg.rope_ref_len and (cfg.rope_dims or head_dim) <= 2:
        problems.append("model.rope_ref_len scales the base by (length / ref)^(d / (d - 2)): it needs more than 2 "
                        "rotated dims (model.rope_dims)")
    if cfg.max_span and not cfg.doc_mask:
        problems.append(f"model.max_span={cfg.max_span} caps document-masked attention: set model.doc_mask=true, "
                        "or model.max_span=0")
    if cfg.doc_mask and (cfg.attention != "gqa" or cfg.bos_id >= cfg.vocab_size):
        problems.append(f"model.doc_mask needs model.attention=gqa and model.bos_id below model.vocab_size="
                        f"{cfg.vocab_size}, got '{cfg.attention}' and {cfg.bos_id}")
    if cfg.position != "rope" and (cfg.rope_dims or cfg.rope_fp32 or cfg.rope_ref_len):
        problems.append("model.rope_dims, model.rope_fp32 and model.rope_ref_len apply only to model.position=rope")
    return problems
