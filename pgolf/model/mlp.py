"""The MLP slot: relu^2 (official) and its variants, one table of activations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.config import ModelConfig
from pgolf.model.layers import CastedLinear
from pgolf.model.registry import MLPS


@dataclass(frozen=True)
class MLPVariant:
    """One MLP kind: plain proj(act(fc(x))), or gated proj(act(gate(x)) * up(x))."""

    activation: Callable[[Tensor, float], Tensor]  # (pre-activation, model.mlp_slope) -> hidden
    gated: bool = False


# `model.mlp` names one entry. A new activation is one line here (and its float64 reference
# in tests/model/test_arch.py); a different MLP module registers its own builder in MLPS.
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
    variant = MLP_VARIANTS.get(cfg.mlp)
    return gated_hidden_size(cfg.model_dim) if variant and variant.gated else cfg.mlp_mult * cfg.model_dim


class MLP(nn.Module):
    """The `model.mlp` variant. Input projections keep the default init (as relu^2's fc); the
    output projection starts at zero. relu^2 is proj(relu(fc(x))^2), the official MLP."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        variant = MLP_VARIANTS[cfg.mlp]
        hidden = mlp_hidden_size(cfg)
        self.activation, self.gated, self.slope = variant.activation, variant.gated, cfg.mlp_slope
        if self.gated:
            self.gate = CastedLinear(cfg.model_dim, hidden)
            self.up = CastedLinear(cfg.model_dim, hidden)
        else:
            self.fc = CastedLinear(cfg.model_dim, hidden)  # the official name: state dicts keep it
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.proj(self.activation(self.gate(x), self.slope) * self.up(x))
        return self.proj(self.activation(self.fc(x), self.slope))


for _name in MLP_VARIANTS:  # every variant is this module with its activation
    MLPS.register(_name)(MLP)


def mlp_problems(cfg: ModelConfig) -> list[str]:
    """What is wrong with the MLP keys of cfg (cfg.mlp is a registered name)."""
    problems = []
    if cfg.mlp_hidden < 0:
        problems.append("model.mlp_hidden must be >= 0 (0: from model.mlp_mult, or 8/3 x model_dim when gated)")
    variant = MLP_VARIANTS.get(cfg.mlp)
    if variant and variant.gated and not cfg.mlp_hidden and cfg.mlp_mult != ModelConfig.mlp_mult:
        problems.append(f"model.mlp_mult={cfg.mlp_mult} does not apply to model.mlp={cfg.mlp} (its hidden size is "
                        f"8/3 x model_dim rounded up to {GATED_HIDDEN_MULTIPLE} = {gated_hidden_size(cfg.model_dim)}); "
                        f"set model.mlp_hidden instead")
    if not math.isfinite(cfg.mlp_slope) or not 0.0 <= cfg.mlp_slope <= 1.0:
        problems.append(f"model.mlp_slope must be within [0, 1], got {cfg.mlp_slope}")
    return problems
