"""Post-training quantization of a state dict for export.

The default scheme, ``"int8"``, reproduces the official parameter-golf export
numerics exactly (``quantize_state_dict_int8`` in openai/parameter-golf
``train_gpt.py``):

* non-float tensors are passed through unchanged (kind ``"raw"``);
* float tensors with at most ``KEEP_FLOAT_MAX_NUMEL`` elements are kept as float
  (kind ``"float"``): control tensors (name contains one of ``CONTROL_PATTERNS``)
  as fp32, other fp32/bf16 tensors stored as fp16 and cast back to their original
  dtype on load, any other float dtype unchanged;
* larger 2-D float tensors get symmetric int8 with one fp16 scale per row
  (kind ``"int8_per_row"``); the clip value of a row is the
  ``CLIP_PERCENTILE``-th percentile of its absolute values (``torch.quantile``,
  linear interpolation) and ``scale = max(clip / 127, 1 / 127)``;
* other large float tensors get one fp32 scale for the whole tensor
  (kind ``"int8_per_tensor"``), ``scale = clip / 127`` or 1 when ``clip == 0``.

New schemes register a per-tensor quantizer in ``SCHEMES``; new storage kinds
register a dequantizer in ``DEQUANTIZERS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pgolf.model import CONTROL_PARAM_PATTERNS

__all__ = [
    "CONTROL_PATTERNS", "KEEP_FLOAT_MAX_NUMEL", "CLIP_PERCENTILE", "KINDS",
    "QuantizedTensor", "QuantStats", "SCHEMES", "DEQUANTIZERS",
    "is_control_tensor", "quantize_tensor_int8", "quantize_state_dict",
    "dequantize_tensor", "dequantize_state_dict", "dtype_name", "dtype_from_name",
]

# The model's small "control" tensors (gains, mixes, skip weights) stay fp32 in the export;
# the optimizer groups them apart by the same names.
CONTROL_PATTERNS: tuple[str, ...] = CONTROL_PARAM_PATTERNS
KEEP_FLOAT_MAX_NUMEL = 65_536
CLIP_PERCENTILE = 99.99984
_CLIP_Q = CLIP_PERCENTILE / 100.0
_QMAX = 127
_QUANTILE_MAX_NUMEL = 1 << 24  # torch.quantile refuses larger flattened inputs

KINDS = ("int8_per_row", "int8_per_tensor", "float", "raw")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype name {name!r}")
    return dtype


@dataclass
class QuantizedTensor:
    """One exported tensor.

    ``data`` is what is stored (int8 codes, kept float values or raw values);
    ``scale`` is the per-row (fp16, shape ``[rows]``) or per-tensor (fp32, 0-d)
    scale, or None; ``orig_dtype`` is the dtype ``dequantize_tensor`` returns.
    """

    kind: str
    data: torch.Tensor
    scale: torch.Tensor | None
    orig_dtype: str

    def __post_init__(self) -> None:
        if self.kind not in DEQUANTIZERS:
            raise ValueError(f"unknown quantized tensor kind {self.kind!r}; known: {sorted(DEQUANTIZERS)}")

    @property
    def nbytes(self) -> int:
        """Stored bytes (data + scale), before any compression."""
        n = _nbytes(self.data)
        return n + (_nbytes(self.scale) if self.scale is not None else 0)


@dataclass
class QuantStats:
    param_count: int = 0
    num_tensors: int = 0
    num_quantized: int = 0
    num_float: int = 0
    num_raw: int = 0
    baseline_bytes: int = 0  # bytes of the state dict as given
    payload_bytes: int = 0   # bytes of data + scales, before compression
    by_kind: dict[str, int] = field(default_factory=dict)  # tensor count per kind


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def is_control_tensor(name: str) -> bool:
    return any(p in name for p in CONTROL_PATTERNS)


def _abs_quantile(x: torch.Tensor, dim: int | None) -> torch.Tensor:
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


def quantize_tensor_int8(name: str, t: torch.Tensor) -> QuantizedTensor:
    """Quantize one tensor with the official int8 rules (see module docstring)."""
    t = t.detach().to("cpu").contiguous()
    src = dtype_name(t.dtype)
    if not t.is_floating_point():
        return QuantizedTensor("raw", t, None, src)

    if t.numel() <= KEEP_FLOAT_MAX_NUMEL:
        if is_control_tensor(name):
            return QuantizedTensor("float", t.float().contiguous(), None, "float32")
        if t.dtype in (torch.float32, torch.bfloat16):
            return QuantizedTensor("float", t.half().contiguous(), None, src)
        return QuantizedTensor("float", t, None, src)

    x = t.float()
    if x.ndim == 2:
        clip = _abs_quantile(x, dim=1)  # one clip value per row
        scale = torch.clamp(clip / _QMAX, min=1.0 / _QMAX)
        lo, hi = -clip[:, None], clip[:, None]
        codes = torch.round(torch.minimum(torch.maximum(x, lo), hi) / scale[:, None])
        codes = codes.clamp(-_QMAX, _QMAX).to(torch.int8).contiguous()
        return QuantizedTensor("int8_per_row", codes, scale.half().contiguous(), src)

    clip_value = float(_abs_quantile(x, dim=None))
    scale = torch.tensor(clip_value / _QMAX if clip_value > 0 else 1.0, dtype=torch.float32)
    codes = torch.round(x.clamp(-clip_value, clip_value) / scale)
    codes = codes.clamp(-_QMAX, _QMAX).to(torch.int8).contiguous()
    return QuantizedTensor("int8_per_tensor", codes, scale, src)


# scheme name -> per-tensor quantizer (name, tensor) -> QuantizedTensor
SCHEMES: dict[str, Callable[[str, torch.Tensor], QuantizedTensor]] = {
    "int8": quantize_tensor_int8,
}


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor], scheme: str = "int8"
) -> tuple[dict[str, QuantizedTensor], QuantStats]:
    """Quantize every tensor of ``state_dict`` (order kept) with ``scheme``."""
    try:
        quantize = SCHEMES[scheme]
    except KeyError:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {sorted(SCHEMES)}") from None
    out: dict[str, QuantizedTensor] = {}
    stats = QuantStats()
    for name, tensor in state_dict.items():
        qt = quantize(name, tensor)
        out[name] = qt
        stats.param_count += tensor.numel()
        stats.num_tensors += 1
        stats.baseline_bytes += _nbytes(tensor)
        stats.payload_bytes += qt.nbytes
        stats.by_kind[qt.kind] = stats.by_kind.get(qt.kind, 0) + 1
        if qt.kind == "raw":
            stats.num_raw += 1
        elif qt.kind == "float":
            stats.num_float += 1
        else:
            stats.num_quantized += 1
    return out, stats


def _deq_per_row(qt: QuantizedTensor) -> torch.Tensor:
    s = qt.scale.float()
    s = s.view(qt.data.shape[0], *([1] * (qt.data.ndim - 1)))
    return qt.data.float() * s


def _deq_per_tensor(qt: QuantizedTensor) -> torch.Tensor:
    return qt.data.float() * float(qt.scale)


def _deq_identity(qt: QuantizedTensor) -> torch.Tensor:
    return qt.data


# kind -> dequantizer; the result is cast to ``orig_dtype`` by dequantize_tensor
DEQUANTIZERS: dict[str, Callable[[QuantizedTensor], torch.Tensor]] = {
    "int8_per_row": _deq_per_row,
    "int8_per_tensor": _deq_per_tensor,
    "float": _deq_identity,
    "raw": _deq_identity,
}


def dequantize_tensor(qt: QuantizedTensor) -> torch.Tensor:
    out = DEQUANTIZERS[qt.kind](qt)
    return out.to(dtype=dtype_from_name(qt.orig_dtype)).contiguous()


def dequantize_state_dict(qdict: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Rebuild a float state dict (same names and order) from ``qdict``."""
    return {name: dequantize_tensor(qt) for name, qt in qdict.items()}
