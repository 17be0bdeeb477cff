"""The quantizer table's types: one entry per storage kind of an exported tensor.

An entry says how the kind is made (``quantize``, where the kind can be asked for directly),
read back (``dequantize``) and named (``label``: "int6", "fp16", "raw", ... in stats, the
container's size breakdown and ``describe_artifact``), plus what the container needs to lay it
out. A kind module defines its functions and calls ``register_quantizer`` once at import;
``pgolf.compress.quantizers.registry`` imports every kind module, so use the table from there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["QuantizedTensor", "Quantizer", "QUANTIZERS", "register_quantizer", "get_quantizer",
           "format_label", "component_label", "dtype_name", "dtype_from_name"]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype name {name!r}")
    return dtype


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class QuantizedTensor:
    """One exported tensor.

    ``data`` is what is stored (int8 codes, kept float values or raw values);
    ``scale`` is the per-row (fp16, shape ``[rows]``) or per-tensor (fp32, 0-d)
    scale, or None; ``orig_dtype`` is the dtype dequantization returns;
    ``bits`` is the code width N of the integer kinds (8 for the official int8 kinds;
    ``"int_per_row"`` codes lie in ``[-(2^(N-1)-1), 2^(N-1)-1]``), unused otherwise.

    For ``"int_per_row"`` the rows are ``data.reshape(scale.numel(), -1)``: a 2-D
    tensor's rows, a 1-D tensor as a single row.
    """

    kind: str
    data: Tensor
    scale: Tensor | None
    orig_dtype: str
    bits: int = 8

    def __post_init__(self) -> None:
        entry = get_quantizer(self.kind)
        if entry.validate is not None:
            entry.validate(self)

    @property
    def num_rows(self) -> int:
        return self.scale.numel() if get_quantizer(self.kind).packable else 0

    @property
    def packed_nbytes(self) -> int:
        """Stored bytes with the codes bit-packed (``ceil(numel * bits / 8)``) + scale."""
        if not get_quantizer(self.kind).packable:
            return self.nbytes
        return (self.data.numel() * self.bits + 7) // 8 + _nbytes(self.scale)

    @property
    def nbytes(self) -> int:
        """Stored bytes (data + scale), before any compression."""
        n = _nbytes(self.data)
        return n + (_nbytes(self.scale) if self.scale is not None else 0)


@dataclass(frozen=True)
class Quantizer:
    """One storage kind.

    ``label(bits, stored dtype name)`` is the format ("int6", "fp16", "raw"); ``part`` names
    what those bytes are in a size breakdown ("int6 codes", "fp16 passthrough", "raw tensors").
    ``rank`` orders the container's grouped layout (0 integer codes, grouped by width; 1 is
    the scales; 2 float passthrough; 3 raw). ``quantize(t, spec, **options)`` makes the kind
    from a tensor, accepting each spec in ``specs`` (bits or float names); None where the kind
    is only made by a caller with its own rules. ``error_bound(x, qt)`` is the element-wise
    bound on ``|dequantize(qt) - x|`` the kind guarantees, for the contract test.
    ``packable``: codes narrower than 8 bits may be bit-packed (and their range is checked)."""

    kind: str
    dequantize: Callable[[QuantizedTensor], Tensor]  # the caller casts to orig_dtype
    label: Callable[[int, str], str]
    part: str
    rank: int
    quantize: Callable[..., QuantizedTensor] | None = None
    specs: tuple = ()
    error_bound: Callable[[Tensor, QuantizedTensor], Tensor] | None = None
    validate: Callable[[QuantizedTensor], None] | None = None
    packable: bool = False


QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(entry: Quantizer) -> Quantizer:
    if entry.kind in QUANTIZERS:
        raise ValueError(f"quantizer kind {entry.kind!r} is registered twice")
    QUANTIZERS[entry.kind] = entry
    return entry


def get_quantizer(kind: str) -> Quantizer:
    try:
        return QUANTIZERS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantized tensor kind {kind!r}; known: {sorted(QUANTIZERS)}") from None


def format_label(kind: str, bits: int, dtype: str) -> str:
    """The stored format of a tensor of ``kind`` whose data have dtype name ``dtype``."""
    return get_quantizer(kind).label(bits, dtype)


def component_label(kind: str, bits: int, dtype: str) -> str:
    """Its data's line in a size breakdown: "int6 codes", "fp16 passthrough", "raw tensors"."""
    return f"{format_label(kind, bits, dtype)} {get_quantizer(kind).part}"
