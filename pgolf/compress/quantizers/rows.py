"""THE per-row symmetric intN quantizer (kind ``"int_per_row"``).

Row ``r`` of a 2-D tensor is stored as ``codes[r] * scale[r]``: codes in ``[-qmax, qmax]``,
``qmax = 2^(N-1) - 1``, held one per int8, and one fp16 scale per row. The scale is rounded to
fp16 *before* the codes are computed, so dequantizing with the stored scale is exact and every
error measured here is the error of what is stored.

Used by the export (``quant.quantize_tensor``), GPTQ's scale initialisation and column rounding
(``gptq``), the bit allocator (``allocate``) and QAT's fake quantization (``train.qat``, without
the clip search). Nothing else computes per-row intN scales or codes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from pgolf.compress.quantizers.base import Quantizer, QuantizedTensor, dtype_name, register_quantizer

__all__ = ["MIN_BITS", "MAX_BITS", "MIN_SCALE", "DEFAULT_CLIP_GRID", "CLIP_RULES", "PERCENTILE_CANDIDATES",
           "qmax_for", "fp16_scale", "round_codes", "row_scales", "percentile_scales", "sdclip_scales", "quantize_rows",
           "dequantize_rows", "quantization_error", "as_rows", "quantize_int_per_row"]

MIN_BITS, MAX_BITS = 2, 8
# clip fractions of max|row| tried by the clip search: 1.0 down to 0.6, 16 points
DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.4 * i / 15, 6) for i in range(16))
# stored scales lie in fp16's positive finite range: never 0 (an all-zero row) nor inf
MIN_SCALE, _FP16_MAX = 2.0 ** -24, 65504.0
# How a searched clip is chosen: "row_search" (row_scales: per row over DEFAULT_CLIP_GRID),
# "percentile" (percentile_scales: PR #549's rule, one of these quantiles of |row| per tensor) or
# "sdclip" (sdclip_scales: PR #1855's k standard deviations of the row, no search).
CLIP_RULES = ("row_search", "percentile", "sdclip")
PERCENTILE_CANDIDATES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
_SEARCH_CHUNK_ELEMS = 1 << 22  # rows are searched in chunks of about this many elements


def qmax_for(bits: int) -> int:
    """Largest code of symmetric intN: ``2^(N-1) - 1`` (127, 31, 15, 7 for 8, 6, 5, 4)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return (1 << (bits - 1)) - 1


def fp16_scale(s: Tensor) -> Tensor:
    """The fp16 value a float32 scale is stored as, back in float32."""
    return s.clamp(MIN_SCALE, _FP16_MAX).half().float()


def round_codes(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """``clamp(round(x / scale), -qmax, qmax)`` as float, ``scale`` per row of ``x`` ([rows])."""
    return torch.div(x, scale[:, None]).round_().clamp_(-qmax, qmax)


def _sq_error(x: Tensor, s: Tensor, qmax: int, col_weight: Tensor | None) -> Tensor:
    d = round_codes(x, s, qmax).mul_(s[:, None]).sub_(x)  # the stored row minus the row
    return torch.linalg.vecdot(d if col_weight is None else d * col_weight, d, dim=1)


def row_scales(w: Tensor, bits: int, clip_search: bool = True, grid: Sequence[float] | None = None,
               col_weight: Tensor | None = None) -> Tensor:
    """Per-row scales of a 2-D ``w`` as float32 holding fp16 values.

    Row ``r``'s clip is ``f * max|w[r]|`` and its scale the fp16 rounding of ``clip / qmax``.
    Without ``clip_search`` ``f = 1``; with it ``f = 1`` and every fraction of ``grid``
    (default ``DEFAULT_CLIP_GRID``) are tried and each row keeps the one of least squared
    error ``sum_j c_j (w_rj - stored_rj)^2``, ``c`` = ``col_weight`` (e.g. a Hessian diagonal)
    or ones. Ties keep the earlier candidate, so the result is deterministic and never worse
    than max-abs."""
    qmax = qmax_for(bits)
    x = w.detach().float()
    amax = x.abs().amax(dim=1) if x.numel() else x.new_zeros(x.shape[0])
    best_s = fp16_scale(amax / qmax)
    if not clip_search or x.numel() == 0:
        return best_s
    fracs = [1.0]
    for f in (DEFAULT_CLIP_GRID if grid is None else grid):
        f = float(f)
        if not 0.0 < f <= 1.0:
            raise ValueError(f"clip grid fractions must lie in (0, 1], got {f}")
        if f not in fracs:
            fracs.append(f)
    if len(fracs) == 1:
        return best_s
    cw = None if col_weight is None else col_weight.detach().float().to(x.device)
    chunk = max(1, _SEARCH_CHUNK_ELEMS // x.shape[1])
    for r0 in range(0, x.shape[0], chunk):
        xr, ar = x[r0:r0 + chunk], amax[r0:r0 + chunk]
        best_err = best = None
        for f in fracs:
            s = fp16_scale(ar * f / qmax)
            err = _sq_error(xr, s, qmax, cw)
            if best is None:
                best_err, best = err, s
            else:
                better = err < best_err
                best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
        best_s[r0:r0 + chunk] = best
    return best_s


def percentile_scales(w: Tensor, bits: int) -> Tensor:
    """PR #549's clip rule ("GPTQ-lite"), for any width: per-row scales of a 2-D ``w`` as float32
    holding fp16 values, ``fp16(max(clip_r / qmax, 1 / qmax))`` with ``clip_r`` the ``p``-quantile
    of ``|w[r]|`` (``torch.quantile``, linear; ``p = 1``: the max) for ONE ``p`` of
    ``PERCENTILE_CANDIDATES``: the one whose codes give the least mean squared error over the
    whole tensor (ties keep the earlier). The ``1 / qmax`` floor (a clip of at least 1.0, as the
    official int8's ``1 / 127``) is the record's and is part of the rule."""
    qmax = qmax_for(bits)
    x = w.detach().float()
    if x.numel() == 0:
        return row_scales(x, bits, clip_search=False)
    a = x.abs()
    best = best_err = None
    for p in PERCENTILE_CANDIDATES:
        clip = a.amax(dim=1) if p == 1.0 else torch.quantile(a, p, dim=1)
        s = fp16_scale((clip / qmax).clamp_min(1.0 / qmax))
        err = float(round_codes(x, s, qmax).mul_(s[:, None]).sub_(x).square_().mean())
        if best is None or err < best_err:
            best, best_err = s, err
    return best


def sdclip_scales(w: Tensor, bits: int, k: float) -> Tensor:
    """PR #1855's SDClip: per-row scales of a 2-D ``w`` as float32 holding fp16 values,
    ``fp16(k * std(w[r]) / qmax)``, std the sample standard deviation (n - 1) of the float32 row,
    computed in that order as the record does (BEST:2162-2163), so the codes match it bit for bit.
    The clip is ``k * std``: with k well above 3 only real outliers are clipped, while the step
    follows the bulk of the row, not its largest value. A row of (near) zeros gets the smallest
    scale (the record's would round to 0 and its codes to NaN); a row of one element has no std
    and is refused."""
    qmax = qmax_for(bits)
    x = w.detach().float()
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"SDClip needs a 2-D tensor with at least 2 columns, got shape {tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0:
        raise ValueError(f"SDClip's k must be a positive number, got {k!r}")
    return fp16_scale(k * x.std(dim=1) / qmax)


def quantize_rows(w: Tensor, bits: int, clip_search: bool = True, grid: Sequence[float] | None = None,
                  col_weight: Tensor | None = None, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row intN of a 2-D tensor -> ``(codes int8 [rows, cols], scale fp16 [rows])``.

    Scales from ``row_scales`` (see there for ``clip_search``, ``grid``, ``col_weight``), or
    ``scale`` ([rows]) rounded to fp16 and used as is. Float32 on ``w``'s device."""
    qmax = qmax_for(bits)
    if w.ndim != 2:
        raise ValueError(f"per-row quantization needs a 2-D tensor, got shape {tuple(w.shape)}")
    x = w.detach().float()
    s = row_scales(x, bits, clip_search, grid, col_weight) if scale is None else fp16_scale(scale.float())
    return round_codes(x, s, qmax).to(torch.int8), s.half()


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` per row, in float32; rows are ``q.reshape(scale.numel(), -1)``."""
    rows = scale.numel()
    if q.numel() == 0:
        return q.float()
    return (q.float().reshape(rows, -1) * scale.float().reshape(rows, 1)).reshape(q.shape)


def quantization_error(w: Tensor, q: Tensor, scale: Tensor, per_row: bool = False) -> float | Tensor:
    """Squared reconstruction error ``sum((q * scale - w)^2)`` of per-row codes (the float
    sum, or with ``per_row`` the float32 tensor of each row's sum). For an allocator:
    ``quantization_error(w, *quantize_rows(w, bits))``."""
    rows = scale.numel()
    diff = dequantize_rows(q, scale) - w.detach().float()
    diff = diff.reshape(rows, diff.numel() // rows if rows else 0)
    err = torch.linalg.vecdot(diff, diff, dim=1)  # the reduction the clip search uses
    return err if per_row else float(err.sum())


def as_rows(t: Tensor) -> Tensor:
    """The rows a tensor is quantized by: a 2-D tensor's own, the first dim of higher ranks,
    a 0-/1-D tensor as one row."""
    if t.ndim == 2:
        return t
    return t.reshape(1, -1) if t.ndim <= 1 else t.reshape(t.shape[0], -1)


# ---------------------------------------------------------------- the registered kind

def quantize_int_per_row(t: Tensor, bits: int, clip_search: bool = True, grid: Sequence[float] | None = None,
                         clip_rule: str = "row_search", sdclip_k: float | None = None) -> QuantizedTensor:
    """Per-row intN of ``as_rows(t)``; ``clip_rule`` (``CLIP_RULES``) is the clip ``clip_search``
    chooses; "sdclip" needs its ``sdclip_k``."""
    if not t.is_floating_point():
        raise ValueError(f"int_per_row needs a float tensor, got {t.dtype}")
    if clip_rule not in CLIP_RULES:
        raise ValueError(f"clip rule must be one of {', '.join(CLIP_RULES)}, got {clip_rule!r}")
    x = as_rows(t.detach())
    scale = None
    if clip_search and clip_rule == "percentile":
        scale = percentile_scales(x, bits)
    elif clip_search and clip_rule == "sdclip":
        if sdclip_k is None:
            raise ValueError("clip rule 'sdclip' needs its k (sdclip_k)")
        scale = sdclip_scales(x, bits, sdclip_k)
    q, s = quantize_rows(x, bits, clip_search=clip_search, grid=grid, scale=scale)
    return QuantizedTensor("int_per_row", q.reshape(t.shape).cpu().contiguous(), s.cpu().contiguous(),
                           dtype_name(t.dtype), bits)


def _dequantize(qt: QuantizedTensor) -> Tensor:
    return dequantize_rows(qt.data, qt.scale)


def _error_bound(x: Tensor, qt: QuantizedTensor) -> Tensor:
    # round to nearest: half a step; a clipped value: its distance to the largest code
    s = dequantize_rows(torch.ones_like(qt.data), qt.scale)
    return torch.maximum(s / 2, x.float().abs() - qmax_for(qt.bits) * s)


def _validate(qt: QuantizedTensor) -> None:
    b = qt.bits
    if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
        raise ValueError(f"int_per_row bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {b!r}")
    if qt.data.dtype != torch.int8 or qt.scale is None:
        raise ValueError("int_per_row needs int8 codes and a per-row scale")


register_quantizer(Quantizer(
    "int_per_row", _dequantize, lambda bits, dtype: f"int{bits}", "codes", rank=0,
    quantize=quantize_int_per_row, specs=tuple(range(MIN_BITS, MAX_BITS + 1)),
    error_bound=_error_bound, validate=_validate, packable=True))
