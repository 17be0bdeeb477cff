"""The official Parameter Golf baseline GPT, readable top to bottom.

Token embedding (tied with the output head) -> RMS norm -> N blocks arranged as a U-Net
(the first half's outputs are added back, with learned per-channel weights, before the
second half's blocks in reverse order) -> final RMS norm -> tanh logit softcap.
Each block mixes its input with the embedding stream x0, then runs GQA attention with
RoPE and RMS-normed Q/K (learnable per-head gain) and a relu^2 MLP, each scaled per channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.config import ModelConfig

# Small "control" parameters: kept in fp32, trained with Adam, exported as fp32.
CONTROL_PARAM_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")


def is_control_param(name: str, param: Tensor) -> bool:
    return param.ndim < 2 or any(p in name for p in CONTROL_PARAM_PATTERNS)


class CastedLinear(nn.Linear):
    """Linear layer whose weight stays fp32 (optimizer quality) and is cast to the input dtype."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.weight_transform = None  # quantization-aware training hook (pgolf.qat)

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


class MLP(nn.Module):
    """relu^2 MLP: proj(relu(fc(x))^2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_mult * cfg.model_dim
        self.fc = CastedLinear(cfg.model_dim, hidden)
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


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


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.num_encoder_layers = cfg.num_layers // 2
        self.num_decoder_layers = cfg.num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim, dtype=torch.float32))
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
        x = rms_norm(self.tok_emb(input_ids))
        x0 = x
        skips = []
        for block in self.blocks[: self.num_encoder_layers]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.num_encoder_layers :]):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
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
