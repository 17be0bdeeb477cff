"""The official parameter-golf int8 export (``quantize_state_dict_int8`` in openai/parameter-golf
``train_gpt.py``), reproduced bit for bit; kinds ``"int8_per_row"`` and ``"int8_per_tensor"``.

A 2-D tensor gets one clip per row, the ``CLIP_PERCENTILE``-th percentile of its absolute values
(``torch.quantile``, linear interpolation), ``scale = max(clip / 127, 1 / 127)`` and
``codes = round(clamp(x, -clip, clip) / scale)``; the scale is stored as fp16 *after* the codes
are computed with the float32 one (unlike ``rows``: that is the official numerics). Any other
shape gets one fp32 scale, ``clip / 127`` or 1 when ``clip == 0``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pgolf.compress.quantizers.base import Quantizer, QuantizedTensor, dtype_name, register_quantizer
from pgolf.compress.quantizers.rows import dequantize_rows

__all__ = ["CLIP_PERCENTILE", "quantize_int8_per_row", "quantize_int8_per_tensor"]

CLIP_PERCENTILE = 99.99984
_CLIP_Q = CLIP_PERCENTILE / 100.0
_QMAX = 127
_QUANTILE_MAX_NUMEL = 1 << 24  # torch.quantile refuses larger flattened inputs


def _abs_quantile(x: Tensor, dim: int | None) -> Tensor:
    """``torch.quantile(|x|, _CLIP_Q, dim)``; for flattened inputs too large for
    torch.quantile, the same linear interpolation computed by hand."""
    a = x.abs()
    if dim is not None or a.numel() <= _QUANTILE_MAX_NUMEL:
        return torch.quantile(a, _CLIP_Q, dim=dim)
    flat = a.flatten()
    # torch.quantile's "linear" rule: rank = q * (n - 1) in the input dtype, then
    # lerp between the order statistics just below and above it.
    rank = torch.tensor(_CLIP_Q, dtype=flat.dtype) * (flat.numel() - 1)
    below = int(rank)
    above = int(torch.ceil(rank))
    lo = flat.kthvalue(below + 1).values
    hi = flat.kthvalue(above + 1).values
    return torch.lerp(lo, hi, rank - below)


def _row_clip_and_scale(x: Tensor) -> tuple[Tensor, Tensor]:
    clip = _abs_quantile(x, dim=1)  # one clip value per row
    return clip, torch.clamp(clip / _QMAX, min=1.0 / _QMAX)


def _check_float(t: Tensor, kind: str) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{kind} needs a float tensor, got {t.dtype}")


def quantize_int8_per_row(t: Tensor, bits: int = 8) -> QuantizedTensor:
    _check_float(t, "int8_per_row")
    t = t.detach().to("cpu")
    x = t.float()
    if x.ndim != 2:
        raise ValueError(f"int8_per_row needs a 2-D tensor, got shape {tuple(x.shape)}")
    clip, scale = _row_clip_and_scale(x)
    lo, hi = -clip[:, None], clip[:, None]
    codes = torch.round(torch.minimum(torch.maximum(x, lo), hi) / scale[:, None])
    codes = codes.clamp(-_QMAX, _QMAX).to(torch.int8).contiguous()
    return QuantizedTensor("int8_per_row", codes, scale.half().contiguous(), dtype_name(t.dtype))


def _tensor_clip(x: Tensor) -> float:
    return float(_abs_quantile(x, dim=None))


def quantize_int8_per_tensor(t: Tensor, bits: int = 8) -> QuantizedTensor:
    _check_float(t, "int8_per_tensor")
    t = t.detach().to("cpu")
    x = t.float()
    clip_value = _tensor_clip(x)
    scale = torch.tensor(clip_value / _QMAX if clip_value > 0 else 1.0, dtype=torch.float32)
    codes = torch.round(x.clamp(-clip_value, clip_value) / scale)
    codes = codes.clamp(-_QMAX, _QMAX).to(torch.int8).contiguous()
    return QuantizedTensor("int8_per_tensor", codes, scale, dtype_name(t.dtype))


def _dequantize_per_row(qt: QuantizedTensor) -> Tensor:
    return dequantize_rows(qt.data, qt.scale)


def _dequantize_per_tensor(qt: QuantizedTensor) -> Tensor:
    return qt.data.float() * float(qt.scale)


def _bound(x: Tensor, clip: Tensor, s32: Tensor, s_stored: Tensor) -> Tensor:
    # clipping + half a step + the codes times the scale's fp16 rounding
    return (x.abs() - clip).clamp(min=0) + s32 / 2 + _QMAX * (s_stored - s32).abs()


def _error_bound_per_row(x: Tensor, qt: QuantizedTensor) -> Tensor:
    x = x.float()
    clip, scale = _row_clip_and_scale(x)
    return _bound(x, clip[:, None], scale[:, None], qt.scale.float()[:, None])


def _error_bound_per_tensor(x: Tensor, qt: QuantizedTensor) -> Tensor:
    x = x.float()
    return _bound(x, torch.tensor(_tensor_clip(x)), qt.scale, qt.scale)


def _validate(qt: QuantizedTensor) -> None:
    if qt.bits != 8:
        raise ValueError(f"kind {qt.kind!r} has 8-bit codes, got bits={qt.bits}")


def _int8_label(bits: int, dtype: str) -> str:
    return f"int{bits}"


register_quantizer(Quantizer("int8_per_row", _dequantize_per_row, _int8_label, "codes", rank=0,
                             quantize=quantize_int8_per_row, specs=(8,), error_bound=_error_bound_per_row,
                             validate=_validate))
register_quantizer(Quantizer("int8_per_tensor", _dequantize_per_tensor, _int8_label, "codes", rank=0,
                             quantize=quantize_int8_per_tensor, specs=(8,), error_bound=_error_bound_per_tensor,
                             validate=_validate))
