"""The official Parameter Golf baseline GPT, readable top to bottom.

Token embedding (tied with the output head) -> RMS norm -> N blocks arranged as a U-Net
(the first half's outputs are added back, with learned per-channel weights, before the
second half's blocks in reverse order) -> final RMS norm -> tanh logit softcap.
Each block mixes its input with the embedding stream x0, then runs GQA attention with
RoPE and RMS-normed Q/K (learnable per-head gain) and a relu^2 MLP, each scaled per channel.

Switches (defaults = the baseline above): the MLP variant (`model.mlp`, MLP_VARIANTS), depth
recurrence (`model.recurrence`: every block runs K times, the U-Net skips only on the last
pass) and the middle cycle (`model.cycle_*`: stem, core x repeats, tail; skips stem -> tail).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.config import ModelConfig

# Small "control" parameters: kept in fp32, trained with Adam, exported as fp32.
CONTROL_PARAM_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")


def is_control_param(name: str, param: Tensor) -> bool:
    return param.ndim < 2 or any(p in name for p in CONTROL_PARAM_PATTERNS)


class CastedLinear(nn.Linear):
    """Linear layer whose weight stays fp32 (optimizer quality) and is cast to the input dtype."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.weight_transform = None  # quantization-aware training hook (pgolf.train.qat)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.weight_transform is None else self.weight_transform(self.weight)
        return F.linear(x, w.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary position tables, cached per (length, device).

    Positions are built in inv_freq's dtype, as the official model does: on CUDA the model is
    cast to bf16, buffers included, so the baseline's angles are bf16 there."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[tuple, Tensor, Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (seq_len, device, self.inv_freq.dtype)
        if self._cache is None or self._cache[0] != key:
            positions = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
            angles = torch.outer(positions, self.inv_freq.to(device))
            self._cache = (key, angles.cos()[None, None], angles.sin()[None, None])
        _, cos, sin = self._cache
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Rotate (first half, second half) pairs of each head's channels.
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
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
        self.rotary = Rotary(self.head_dim, cfg.rope_base)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq_len, dim = x.shape
        q = self.c_q(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(seq_len, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, dim))


@dataclass(frozen=True)
class MLPVariant:
    """One MLP kind: plain proj(act(fc(x))), or gated proj(act(gate(x)) * up(x))."""

    activation: Callable[[Tensor, float], Tensor]  # (pre-activation, model.mlp_slope) -> hidden
    gated: bool = False


# The MLP registry: `model.mlp` names one entry. A new variant is one line here.
MLP_VARIANTS: dict[str, MLPVariant] = {
    "relu2": MLPVariant(lambda h, slope: torch.relu(h).square()),  # the official baseline
    "leaky_relu2": MLPVariant(lambda h, slope: F.leaky_relu(h, slope).square()),
    "gelu": MLPVariant(lambda h, slope: F.gelu(h)),
    "silu": MLPVariant(lambda h, slope: F.silu(h)),
    "swiglu": MLPVariant(lambda h, slope: F.silu(h), gated=True),
}
GATED_HIDDEN_MULTIPLE = 64


def gated_hidden_size(model_dim: int) -> int:
    """8/3 x model_dim rounded up to a multiple of 64: three matrices of this width hold
    about the parameters of two at 4 x model_dim (512 -> 1408)."""
    return -(-(model_dim * 8 // 3) // GATED_HIDDEN_MULTIPLE) * GATED_HIDDEN_MULTIPLE


def mlp_hidden_size(cfg: ModelConfig) -> int:
    """model.mlp_hidden when set; else mlp_mult x model_dim, or gated_hidden_size for gated MLPs."""
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    return gated_hidden_size(cfg.model_dim) if MLP_VARIANTS[cfg.mlp].gated else cfg.mlp_mult * cfg.model_dim


class MLP(nn.Module):
    """The `model.mlp` variant. Input projections keep the default init (as relu^2's fc); the
    output projection starts at zero. relu^2 is proj(relu(fc(x))^2), the official MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        variant = MLP_VARIANTS[cfg.mlp]
        hidden = mlp_hidden_size(cfg)
        self.activation, self.gated, self.slope = variant.activation, variant.gated, cfg.mlp_slope
        if self.gated:
            self.gate = CastedLinear(cfg.model_dim, hidden)
            self.up = CastedLinear(cfg.model_dim, hidden)
        else:
            self.fc = CastedLinear(cfg.model_dim, hidden)
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.proj(self.activation(self.gate(x), self.slope) * self.up(x))
        return self.proj(self.activation(self.fc(x), self.slope))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.model_dim
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        # Row 0 weighs the residual stream, row 1 the embedding stream x0.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


@dataclass(frozen=True)
class BlockSchedule:
    """The order GPT runs its blocks in, as indices into GPT.blocks.

    plain: run first, without skips (recurrence passes 1..K-1); encoder: each output is kept
    for a skip; middle: no skips (the repeated core); decoder: each block first adds, while
    any remain, the latest kept output (last in, first out) times its skip weight."""

    plain: tuple[int, ...]
    encoder: tuple[int, ...]
    middle: tuple[int, ...]
    decoder: tuple[int, ...]

    @property
    def num_skips(self) -> int:
        return min(len(self.encoder), len(self.decoder))

    @property
    def effective_depth(self) -> int:
        return len(self.plain) + len(self.encoder) + len(self.middle) + len(self.decoder)


def cycle_enabled(cfg: ModelConfig) -> bool:
    return any((cfg.cycle_stem, cfg.cycle_core, cfg.cycle_repeats, cfg.cycle_tail))


def block_schedule(cfg: ModelConfig) -> BlockSchedule:
    """Flat U-Net (first half encoder, rest decoder), run after recurrence - 1 plain passes over
    every block; or the middle cycle: stem (encoder), core x repeats (middle), tail (decoder)."""
    n = cfg.num_layers
    if cycle_enabled(cfg):
        stem, core = cfg.cycle_stem, cfg.cycle_core
        return BlockSchedule((), tuple(range(stem)), tuple(range(stem, stem + core)) * cfg.cycle_repeats,
                             tuple(range(stem + core, n)))
    half = n // 2
    return BlockSchedule(tuple(range(n)) * (cfg.recurrence - 1), tuple(range(half)), (), tuple(range(half, n)))


def model_config_problems(cfg: ModelConfig) -> list[str]:
    """What is wrong with the architecture switches of cfg (for pgolf.config.validate)."""
    problems = []
    if cfg.mlp not in MLP_VARIANTS:
        return [f"model.mlp must be one of {', '.join(MLP_VARIANTS)}, got '{cfg.mlp}'"]
    if cfg.mlp_hidden < 0:
        problems.append("model.mlp_hidden must be >= 0 (0: from model.mlp_mult, or 8/3 x model_dim when gated)")
    if MLP_VARIANTS[cfg.mlp].gated and not cfg.mlp_hidden and cfg.mlp_mult != ModelConfig.mlp_mult:
        problems.append(f"model.mlp_mult={cfg.mlp_mult} does not apply to model.mlp={cfg.mlp} (its hidden size is "
                        f"8/3 x model_dim rounded up to {GATED_HIDDEN_MULTIPLE} = {gated_hidden_size(cfg.model_dim)}); "
                        f"set model.mlp_hidden instead")
    if not math.isfinite(cfg.mlp_slope) or not 0.0 <= cfg.mlp_slope <= 1.0:
        problems.append(f"model.mlp_slope must be within [0, 1], got {cfg.mlp_slope}")
    if cfg.recurrence < 1:
        problems.append(f"model.recurrence must be >= 1 (1: every block runs once), got {cfg.recurrence}")
    if cycle_enabled(cfg):
        parts = (cfg.cycle_stem, cfg.cycle_core, cfg.cycle_repeats, cfg.cycle_tail)
        if cfg.recurrence != 1:
            problems.append("model.recurrence and the middle cycle (model.cycle_*) exclude each other: "
                            "set model.recurrence=1 or the cycle_* keys to 0")
        if min(parts) < 0 or cfg.cycle_core < 1 or cfg.cycle_repeats < 1:
            problems.append("the middle cycle needs model.cycle_core >= 1 and model.cycle_repeats >= 1 "
                            "(model.cycle_stem, model.cycle_tail >= 0)")
        elif cfg.cycle_stem + cfg.cycle_core + cfg.cycle_tail != cfg.num_layers:
            problems.append(f"model.num_layers={cfg.num_layers} must equal model.cycle_stem + model.cycle_core + "
                            f"model.cycle_tail = {cfg.cycle_stem + cfg.cycle_core + cfg.cycle_tail} (the unique "
                            f"blocks); set model.num_layers={cfg.cycle_stem + cfg.cycle_core + cfg.cycle_tail}")
    return problems


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.schedule = block_schedule(cfg)
        self.unique_depth = cfg.num_layers  # distinct blocks (parameters)
        self.effective_depth = self.schedule.effective_depth  # blocks run per forward pass
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.num_encoder_layers = len(self.schedule.encoder)
        self.num_decoder_layers = len(self.schedule.decoder)
        self.skip_weights = nn.Parameter(torch.ones(self.schedule.num_skips, cfg.model_dim, dtype=torch.float32))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        self._init_weights()

    def _init_weights(self) -> None:
        # Linear layers keep PyTorch's default (Kaiming-uniform) init, as the official baseline.
        if self.cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.cfg.tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, CastedLinear) and module.zero_init:
                nn.init.zeros_(module.weight)

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        schedule = self.schedule
        x = rms_norm(self.tok_emb(input_ids))
        x0 = x
        for i in schedule.plain:
            x = self.blocks[i](x, x0)
        skips = []
        for i in schedule.encoder:
            x = self.blocks[i](x, x0)
            skips.append(x)
        for i in schedule.middle:
            x = self.blocks[i](x, x0)
        for j, i in enumerate(schedule.decoder):
            if skips:
                x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            x = self.blocks[i](x, x0)
        return rms_norm(x)

    def logits(self, input_ids: Tensor) -> Tensor:
        """Softcapped logits, shape (batch, seq, vocab)."""
        x = self.hidden_states(input_ids)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        raw = F.linear(x, head.to(x.dtype))
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(raw / cap)

    def forward(self, input_ids: Tensor, target_ids: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy in nats (fp32) of target_ids given input_ids."""
        logits = self.logits(input_ids)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction=reduction
        )


def build_model(cfg: ModelConfig, device: torch.device) -> GPT:
    """Build on device. On CUDA the official layout: bf16 body, fp32 linears and controls."""
    model = GPT(cfg).to(device)
    if device.type == "cuda":
        model.bfloat16()
        for module in model.modules():
            if isinstance(module, CastedLinear):
                module.float()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if is_control_param(name, param):
                    param.data = param.data.float()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
