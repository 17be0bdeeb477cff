"""Tensors kept as they are: ``"float"`` (a float dtype, possibly narrower than the source, cast
back to it on load) and ``"raw"`` (non-float tensors, stored unchanged)."""
from __future__ import annotations

import torch
from torch import Tensor

from pgolf.compress.quantizers.base import Quantizer, QuantizedTensor, dtype_name, register_quantizer

__all__ = ["FLOAT_SPECS", "quantize_float", "quantize_raw"]

# what a policy may ask for instead of a bit width: keep the tensor as that float
FLOAT_SPECS = ("fp16", "fp32")
_STORED = {"fp16": torch.float16, "fp32": torch.float32}
_SHORT = {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}


def quantize_float(t: Tensor, spec: str | None = None) -> QuantizedTensor:
    """Keep ``t`` as a float: ``"fp16"``/``"fp32"`` store that dtype; None is the official
    passthrough (fp32 and bf16 stored as fp16, other float dtypes unchanged). Dequantized
    back to ``t``'s dtype."""
    t = t.detach()
    if not t.is_floating_point():
        raise ValueError(f"kind 'float' needs a float tensor, got {t.dtype}")
    if spec is None:
        store = torch.float16 if t.dtype in (torch.float32, torch.bfloat16) else t.dtype
    elif spec in _STORED:
        store = _STORED[spec]
    else:
        raise ValueError(f"float spec must be one of {FLOAT_SPECS} or None, got {spec!r}")
    return QuantizedTensor("float", t.to("cpu", store).contiguous(), None, dtype_name(t.dtype))


def quantize_raw(t: Tensor, spec: None = None) -> QuantizedTensor:
    t = t.detach().to("cpu").contiguous()
    return QuantizedTensor("raw", t, None, dtype_name(t.dtype))


def _identity(qt: QuantizedTensor) -> Tensor:
    return qt.data


def _float_bound(x: Tensor, qt: QuantizedTensor) -> Tensor:
    # one rounding to the stored dtype (relative half-ulp; its smallest subnormal step near 0)
    info = torch.finfo(qt.data.dtype)
    return x.double().abs() * info.eps / 2 + info.smallest_normal * info.eps / 2


def _raw_bound(x: Tensor, qt: QuantizedTensor) -> Tensor:
    return torch.zeros(x.shape, dtype=torch.float64)


register_quantizer(Quantizer("float", _identity, lambda bits, dtype: _SHORT.get(dtype, dtype), "passthrough",
                             rank=2, quantize=quantize_float, specs=(None, *FLOAT_SPECS), error_bound=_float_bound))
register_quantizer(Quantizer("raw", _identity, lambda bits, dtype: "raw", "tensors", rank=3,
                             quantize=quantize_raw, specs=(None,), error_bound=_raw_bound))
