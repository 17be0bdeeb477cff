"""The two building blocks every slot uses: a linear layer and the RMS norm."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.roles import Role, tag


class CastedLinear(nn.Linear):
    """Linear layer whose weight stays fp32 (optimizer quality) and is cast to the input dtype.

    zero_init: the weight starts at zero, as the official output projections do, so every block
    starts as the identity on the residual stream (the default init still runs first: the same
    random draws whatever the flag)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False, role: Role = Role.MATRIX):
        super().__init__(in_features, out_features, bias=False)
        tag(self, role, "weight")
        self.zero_init = zero_init
        if zero_init:
            nn.init.zeros_(self.weight)
        self.weight_transform = None  # quantization-aware training hook (pgolf.train.qat)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.weight_transform is None else self.weight_transform(self.weight)
        return F.linear(x, w.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))
