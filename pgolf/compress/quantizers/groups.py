"""Grouped intN with the full two's-complement range (kind ``"int_group"``): PR #1855's storage of
its LQER factors (pgolf.compress.lqer), usable for any small float tensor.

The tensor is flattened and cut into groups of ``g`` consecutive elements (one group: the whole
tensor); group ``j`` is stored as ``codes[j] * scale[j]`` with one fp16 scale per group,
``scale = fp16(max|group| / (2^(N-1) - 1/2))``, and codes ``clamp(round(x / scale), -2^(N-1),
2^(N-1) - 1)``, held one per int8. Unlike ``rows`` the negative end has one code more: with the
half step in the scale, the largest value lands exactly half-way and rounds to the extra code on
the negative side, or is clamped one step short on the positive side. For N = 2 that is the
record's INT2 in [-2, 1] with ``max / 1.5``, for N = 4 its INT4 in [-8, 7] with ``max / 7.5``
(BEST:2206-2217); the scale is rounded to fp16 before the codes are computed, as there.

The scales are the rows of ``dequantize_rows``: codes reshaped to ``[groups, g]``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pgolf.compress.quantizers.base import Quantizer, QuantizedTensor, dtype_name, register_quantizer
from pgolf.compress.quantizers.rows import MAX_BITS, MIN_BITS, dequantize_rows, fp16_scale

__all__ = ["code_range", "quantize_int_group"]


def code_range(bits: int) -> tuple[int, int]:
    """``(-2^(N-1), 2^(N-1) - 1)``: [-2, 1] for N = 2, [-8, 7] for N = 4."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def quantize_int_group(t: Tensor, bits: int, group: int | None = None) -> QuantizedTensor:
    """Grouped intN of ``t`` (any shape, flattened in C order), ``group`` consecutive elements per
    fp16 scale (None: one scale for the whole tensor); ``group`` must divide ``t.numel()``."""
    if not t.is_floating_point():
        raise ValueError(f"int_group needs a float tensor, got {t.dtype}")
    lo, hi = code_range(bits)
    x = t.detach().to("cpu").float().reshape(-1)
    g = x.numel() if group is None else group
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or x.numel() % g:
        raise ValueError(f"int_group's group must be a positive divisor of the tensor's {x.numel()} elements, "
                         f"got {group!r}")
    x = x.reshape(-1, g)
    scale = fp16_scale(x.abs().amax(dim=1) / (hi + 0.5))
    codes = torch.div(x, scale[:, None]).round_().clamp_(lo, hi).to(torch.int8)
    return QuantizedTensor("int_group", codes.reshape(t.shape).contiguous(), scale.half().contiguous(),
                           dtype_name(t.dtype), bits)


def _dequantize(qt: QuantizedTensor) -> Tensor:
    return dequantize_rows(qt.data, qt.scale)


def _error_bound(x: Tensor, qt: QuantizedTensor) -> Tensor:
    # half a step; beyond the largest positive code (the negative end has one more), the clamp
    s = dequantize_rows(torch.ones_like(qt.data), qt.scale)
    return torch.maximum(s / 2, x.float().abs() - code_range(qt.bits)[1] * s)


def _validate(qt: QuantizedTensor) -> None:
    code_range(qt.bits)
    if qt.data.dtype != torch.int8 or qt.scale is None or qt.scale.numel() == 0 \
            or qt.data.numel() % qt.scale.numel():
        raise ValueError("int_group needs int8 codes and one scale per group of equally many codes")


register_quantizer(Quantizer(
    "int_group", _dequantize, lambda bits, dtype: f"int{bits}g", "codes", rank=0,
    quantize=quantize_int_group, specs=tuple(range(MIN_BITS, MAX_BITS + 1)),
    error_bound=_error_bound, validate=_validate))
