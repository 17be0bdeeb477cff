"""Attention ("gqa", the official) and its position encoding ("rope")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.config import ModelConfig
from pgolf.model.layers import CastedLinear, rms_norm
from pgolf.model.registry import ATTENTIONS, POSITIONS
from pgolf.model.roles import Role, tag


class Rotary(nn.Module):
    """Rotary position encoding, tables cached per (length, device).

    Positions are built in inv_freq's dtype, as the official model does: on CUDA the model is
    cast to bf16, buffers included, so the baseline's angles are bf16 there."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[tuple, Tensor, Tensor] | None = None

    def tables(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (seq_len, device, self.inv_freq.dtype)
        if self._cache is None or self._cache[0] != key:
            positions = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
            angles = torch.outer(positions, self.inv_freq.to(device))
            self._cache = (key, angles.cos()[None, None], angles.sin()[None, None])
        _, cos, sin = self._cache
        return cos.to(dtype), sin.to(dtype)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.tables(q.size(-2), q.device, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Rotate (first half, second half) pairs of each head's channels.
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


@POSITIONS.register("rope")
def rope(cfg: ModelConfig, head_dim: int) -> Rotary:
    return Rotary(head_dim, cfg.rope_base)


@ATTENTIONS.register("gqa")
class CausalSelfAttention(nn.Module):
    """Causal attention with grouped K/V heads (num_kv_heads <= num_heads), RMS-normed Q and K
    (so the learned per-head gain q_gain alone sets the logit scale), the `model.position`
    encoding, and a zero-initialised output projection."""

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

    def forward(self, x: Tensor, extras: dict[str, Tensor] | None = None) -> Tensor:
        batch, seq_len, dim = x.shape
        q = self.c_q(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.position(rms_norm(q), rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, dim))
