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

Lower-bit schemes (``"int6"``, ``"int5"``, ``"int4"``; see ``SCHEMES``) and per-tensor
policies (``bits_for``, ``policy_bits``) use symmetric per-row intN
(kind ``"int_per_row"``, ``QuantizedTensor.bits`` = N): codes in
``[-(2^(N-1)-1), 2^(N-1)-1]`` stored one per int8, one fp16 scale per row, dequantized as
``code * scale``. The clip of a row is ``f * max|row|`` with ``f`` chosen from a small
grid (``DEFAULT_CLIP_GRID``, 1.0 down to 0.6) to minimise the row's squared
reconstruction error measured with the fp16-rounded scale, i.e. with exactly what is
stored ("GPTQ-lite" clip search of the records; see ``quantize_rows``). Whatever the
scheme or policy, non-float tensors stay raw and float tensors of at most
``KEEP_FLOAT_MAX_NUMEL`` elements follow the official passthrough rules above; only
larger float tensors are quantized (or kept as fp16/fp32 when the policy says so). Bit
packing lives in ``pgolf.compress.packing`` and is the artifact's business; in memory one code is
one int8.

New storage kinds register a dequantizer in ``DEQUANTIZERS``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, Union

import torch

from pgolf.model.gpt import CONTROL_PARAM_PATTERNS

__all__ = [
    "CONTROL_PATTERNS", "KEEP_FLOAT_MAX_NUMEL", "CLIP_PERCENTILE", "KINDS",
    "QuantizedTensor", "QuantStats", "SCHEMES", "DEQUANTIZERS",
    "is_control_tensor", "quantize_tensor_int8", "quantize_state_dict",
    "dequantize_tensor", "dequantize_state_dict", "dtype_name", "dtype_from_name",
    "MIN_BITS", "MAX_BITS", "FLOAT_SPECS", "DEFAULT_CLIP_GRID", "BitsSpec", "BitsFor",
    "qmax_for", "quantize_rows", "dequantize_rows", "quantization_error", "quantize_tensor",
    "policy_bits", "check_bits_spec",
]

# The model's small "control" tensors (gains, mixes, skip weights) stay fp32 in the export;
# the optimizer groups them apart by the same names.
CONTROL_PATTERNS: tuple[str, ...] = CONTROL_PARAM_PATTERNS
KEEP_FLOAT_MAX_NUMEL = 65_536
CLIP_PERCENTILE = 99.99984
_CLIP_Q = CLIP_PERCENTILE / 100.0
_QMAX = 127
_QUANTILE_MAX_NUMEL = 1 << 24  # torch.quantile refuses larger flattened inputs

KINDS = ("int8_per_row", "int8_per_tensor", "int_per_row", "float", "raw")

MIN_BITS, MAX_BITS = 2, 8
# what a policy may ask for instead of a bit width: keep the tensor as a float
FLOAT_SPECS = ("fp16", "fp32")
# clip fractions of max|row| tried by the per-row clip search: 1.0 down to 0.6, 16 points
DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.4 * i / 15, 6) for i in range(16))
_FP16_MIN_SUBNORMAL, _FP16_MAX = 2.0 ** -24, 65504.0
_SEARCH_CHUNK_ELEMS = 1 << 22  # rows are searched in chunks of about this many elements

BitsSpec = Union[int, str, None]  # N in [MIN_BITS, MAX_BITS], "fp16", "fp32", or None (= default)
BitsFor = Callable[[str, torch.Tensor], BitsSpec]


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
    scale, or None; ``orig_dtype`` is the dtype ``dequantize_tensor`` returns;
    ``bits`` is the code width N of the integer kinds (8 for the official int8 kinds;
    ``"int_per_row"`` codes lie in ``[-(2^(N-1)-1), 2^(N-1)-1]``), unused otherwise.

    For ``"int_per_row"`` the rows are ``data.reshape(scale.numel(), -1)``: a 2-D
    tensor's rows, a 1-D tensor as a single row.
    """

    kind: str
    data: torch.Tensor
    scale: torch.Tensor | None
    orig_dtype: str
    bits: int = 8

    def __post_init__(self) -> None:
        if self.kind not in DEQUANTIZERS:
            raise ValueError(f"unknown quantized tensor kind {self.kind!r}; known: {sorted(DEQUANTIZERS)}")
        if self.kind == "int_per_row":
            if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
                raise ValueError(f"int_per_row bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
            if self.data.dtype != torch.int8 or self.scale is None:
                raise ValueError("int_per_row needs int8 codes and a per-row scale")
        elif self.kind.startswith("int8") and self.bits != 8:
            raise ValueError(f"kind {self.kind!r} has 8-bit codes, got bits={self.bits}")

    @property
    def num_rows(self) -> int:
        return self.scale.numel() if self.kind == "int_per_row" else 0

    @property
    def packed_nbytes(self) -> int:
        """Stored bytes with the codes bit-packed (``ceil(numel * bits / 8)``) + scale."""
        if self.kind != "int_per_row":
            return self.nbytes
        return (self.data.numel() * self.bits + 7) // 8 + _nbytes(self.scale)

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
    payload_bytes: int = 0   # bytes of data + scales, before compression (one code per byte)
    packed_payload_bytes: int = 0  # the same with intN codes bit-packed
    quantized_params: int = 0  # elements stored as integer codes (any kind int*)
    by_kind: dict[str, int] = field(default_factory=dict)  # tensor count per kind
    # elements per stored format: "int8", "int6", ..., "fp16", "fp32", "bf16", "raw"
    params_by_format: dict[str, int] = field(default_factory=dict)


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


# ---------------------------------------------------------------- per-row intN

def qmax_for(bits: int) -> int:
    """Largest code of symmetric intN: ``2^(N-1) - 1`` (127, 31, 15, 7 for 8, 6, 5, 4)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return (1 << (bits - 1)) - 1


def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """The fp16 value a float32 scale is stored as, back in float32. Never 0 or inf."""
    return s.clamp(_FP16_MIN_SUBNORMAL, _FP16_MAX).half().float()


def _codes(x: torch.Tensor, s: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.div(x, s[:, None]).round_().clamp_(-qmax, qmax)


def quantize_rows(w: torch.Tensor, bits: int, clip_search: bool = True,
                  grid: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row intN of a 2-D tensor -> ``(codes int8 [rows, cols], scale fp16 [rows])``.

    Row ``r`` is stored as ``codes[r] * scale[r]`` with codes in ``[-qmax, qmax]``,
    ``qmax = 2^(N-1) - 1``. Its clip is ``c = f * max|w[r]|`` and its scale the fp16
    rounding of ``c / qmax`` (kept within fp16's positive finite range). Without
    ``clip_search`` ``f = 1`` (max-abs clip); with it, ``f = 1`` and every fraction of
    ``grid`` (default ``DEFAULT_CLIP_GRID``) are tried and each row keeps the one with the
    smallest squared reconstruction error, computed with the fp16 scale that is stored
    (ties keep the earlier candidate, so the result is never worse than max-abs and is
    deterministic). Computed in float32 on ``w``'s device, vectorised over rows."""
    qmax = qmax_for(bits)
    if w.ndim != 2:
        raise ValueError(f"quantize_rows needs a 2-D tensor, got shape {tuple(w.shape)}")
    x = w.detach().float()
    rows, cols = x.shape
    if x.numel() == 0:
        return (torch.zeros(rows, cols, dtype=torch.int8, device=x.device),
                torch.ones(rows, dtype=torch.float16, device=x.device))
    fracs = [1.0]
    if clip_search:
        for f in (DEFAULT_CLIP_GRID if grid is None else grid):
            f = float(f)
            if not 0.0 < f <= 1.0:
                raise ValueError(f"clip grid fractions must lie in (0, 1], got {f}")
            if f not in fracs:
                fracs.append(f)
    amax = x.abs().amax(dim=1)
    best_s = _fp16_scale(amax / qmax)
    if len(fracs) > 1:
        chunk = max(1, _SEARCH_CHUNK_ELEMS // cols)
        for r0 in range(0, rows, chunk):
            xr, ar = x[r0:r0 + chunk], amax[r0:r0 + chunk]
            best_err = best = None
            for f in fracs:
                s = _fp16_scale(ar * f / qmax)
                d = _codes(xr, s, qmax).mul_(s[:, None]).sub_(xr)  # the stored row minus the row
                err = torch.linalg.vecdot(d, d, dim=1)
                if best is None:
                    best_err, best = err, s
                else:
                    better = err < best_err
                    best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
            best_s[r0:r0 + chunk] = best
    return _codes(x, best_s, qmax).to(torch.int8), best_s.half()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` per row, in float32; rows are ``q.reshape(scale.numel(), -1)``."""
    rows = scale.numel()
    if q.numel() == 0:
        return q.float()
    return (q.float().reshape(rows, -1) * scale.float().reshape(rows, 1)).reshape(q.shape)


def quantization_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       per_row: bool = False) -> float | torch.Tensor:
    """Squared reconstruction error ``sum((q * scale - w)^2)`` of per-row codes (the float
    sum, or with ``per_row`` the float32 tensor of each row's sum). For an allocator:
    ``quantization_error(w, *quantize_rows(w, bits))``."""
    rows = scale.numel()
    diff = dequantize_rows(q, scale) - w.detach().float()
    diff = diff.reshape(rows, diff.numel() // rows if rows else 0)
    err = torch.linalg.vecdot(diff, diff, dim=1)  # the reduction quantize_rows searches with
    return err if per_row else float(err.sum())


def check_bits_spec(spec: BitsSpec, where: str = "bits") -> BitsSpec:
    """Validate one policy value: an int in [MIN_BITS, MAX_BITS], "fp16", "fp32" or None."""
    if spec is None or spec in FLOAT_SPECS:
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool) and MIN_BITS <= spec <= MAX_BITS:
        return spec
    raise ValueError(f"{where} must be an int in [{MIN_BITS}, {MAX_BITS}], "
                     f"{' or '.join(repr(s) for s in FLOAT_SPECS)}, or None; got {spec!r}")


def policy_bits(policy: Iterable[Sequence], default: BitsSpec = None) -> BitsFor:
    """A ``bits_for`` from ``[(regex, spec), ...]``: the first pattern that ``re.search``
    finds in the parameter name gives its spec (bits, "fp16" or "fp32"); ``default``
    when none matches (None = the scheme's default). E.g.
    ``policy_bits([["tok_emb", "fp16"], ["mlp", 5], ["attn", 6]])``."""
    rules = []
    for i, item in enumerate(policy):
        if isinstance(item, (str, bytes)) or len(item) != 2:
            raise ValueError(f"bit policy entry {i} must be a [pattern, bits] pair, got {item!r}")
        pattern, spec = item
        try:
            rx = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"bit policy entry {i}: bad pattern {pattern!r}: {e}") from None
        rules.append((rx, check_bits_spec(spec, f"bit policy entry {i} ({pattern!r})")))
    check_bits_spec(default, "bit policy default")

    def bits_for(name: str, tensor: torch.Tensor | None = None) -> BitsSpec:
        for rx, spec in rules:
            if rx.search(name):
                return spec
        return default

    bits_for.rules = tuple((rx.pattern, spec) for rx, spec in rules)  # for logs
    return bits_for


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 2:
        return t
    return t.reshape(1, -1) if t.ndim <= 1 else t.reshape(t.shape[0], -1)


def quantize_tensor(name: str, t: torch.Tensor, bits: BitsSpec = None, clip_search: bool = True,
                    grid: Sequence[float] | None = None) -> QuantizedTensor:
    """Quantize one tensor with an explicit spec. Non-float tensors and float tensors of at
    most ``KEEP_FLOAT_MAX_NUMEL`` elements follow the official rules whatever ``bits`` is;
    otherwise ``bits=None`` is the official int8, an int N is per-row intN
    (``quantize_rows``; tensors that are not 2-D use their first dim as rows, 1-D ones
    are one row), "fp16"/"fp32" keep the tensor as that float (dequantized back to its
    dtype)."""
    check_bits_spec(bits)
    t = t.detach()
    if bits is None or not t.is_floating_point() or t.numel() <= KEEP_FLOAT_MAX_NUMEL:
        return quantize_tensor_int8(name, t)
    src = dtype_name(t.dtype)
    if bits == "fp16":
        return QuantizedTensor("float", t.to("cpu", torch.float16).contiguous(), None, src)
    if bits == "fp32":
        return QuantizedTensor("float", t.to("cpu", torch.float32).contiguous(), None, src)
    q, s = quantize_rows(_as_rows(t), bits, clip_search=clip_search, grid=grid)
    return QuantizedTensor("int_per_row", q.reshape(t.shape).cpu().contiguous(), s.cpu().contiguous(), src, bits)


# scheme name -> bits of the large 2-D float tensors; "int8" is the official export
SCHEMES: dict[str, int] = {"int8": 8, "int6": 6, "int5": 5, "int4": 4}


def _format_of(qt: QuantizedTensor) -> str:
    if qt.kind == "raw":
        return "raw"
    if qt.kind == "float":
        return {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}.get(dtype_name(qt.data.dtype),
                                                                            dtype_name(qt.data.dtype))
    return f"int{qt.bits}"


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor], scheme: str = "int8", bits_for: BitsFor | None = None,
    clip_search: bool | None = None, grid: Sequence[float] | None = None,
) -> tuple[dict[str, QuantizedTensor], QuantStats]:
    """Quantize every tensor of ``state_dict`` (order kept).

    ``scheme`` gives the default for float tensors of more than ``KEEP_FLOAT_MAX_NUMEL``
    elements: ``"int8"`` is the official export (bit-exact with train_gpt.py), ``"int6"``,
    ``"int5"``, ``"int4"`` quantize 2-D ones per row at that width (other shapes keep the
    official per-tensor int8). ``bits_for(name, tensor)`` is asked about each such large
    float tensor (any shape) and may return bits N (per-row intN), ``"fp16"``/``"fp32"``
    (kept as that float) or None (the scheme's default); ``policy_bits`` builds one from
    regex rules. Small and non-float tensors always follow the official rules.

    ``clip_search``: None (default) searches the clip of every per-row intN tensor but
    leaves the official int8 alone; True also replaces the official int8 of 2-D tensors by
    per-row int8 with clip search; False uses the max-abs clip for per-row intN (and the
    official int8 where it applies)."""
    try:
        default_bits = SCHEMES[scheme]
    except KeyError:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {sorted(SCHEMES)}") from None
    official_int8 = scheme == "int8" and clip_search is not True
    search = clip_search is not False
    out: dict[str, QuantizedTensor] = {}
    stats = QuantStats()
    for name, tensor in state_dict.items():
        spec: BitsSpec = None
        if bits_for is not None and tensor.is_floating_point() and tensor.numel() > KEEP_FLOAT_MAX_NUMEL:
            spec = check_bits_spec(bits_for(name, tensor), f"bits_for({name!r})")
        if spec is None and tensor.ndim == 2 and not official_int8:
            spec = default_bits
        qt = quantize_tensor(name, tensor, spec, clip_search=search, grid=grid)
        out[name] = qt
        stats.param_count += tensor.numel()
        stats.num_tensors += 1
        stats.baseline_bytes += _nbytes(tensor)
        stats.payload_bytes += qt.nbytes
        stats.packed_payload_bytes += qt.packed_nbytes
        stats.by_kind[qt.kind] = stats.by_kind.get(qt.kind, 0) + 1
        fmt = _format_of(qt)
        stats.params_by_format[fmt] = stats.params_by_format.get(fmt, 0) + tensor.numel()
        if qt.kind == "raw":
            stats.num_raw += 1
        elif qt.kind == "float":
            stats.num_float += 1
        else:
            stats.num_quantized += 1
            stats.quantized_params += tensor.numel()
    return out, stats


def _deq_per_row(qt: QuantizedTensor) -> torch.Tensor:
    s = qt.scale.float()
    s = s.view(qt.data.shape[0], *([1] * (qt.data.ndim - 1)))
    return qt.data.float() * s


def _deq_per_tensor(qt: QuantizedTensor) -> torch.Tensor:
    return qt.data.float() * float(qt.scale)


def _deq_int_per_row(qt: QuantizedTensor) -> torch.Tensor:
    return dequantize_rows(qt.data, qt.scale)


def _deq_identity(qt: QuantizedTensor) -> torch.Tensor:
    return qt.data


# kind -> dequantizer; the result is cast to ``orig_dtype`` by dequantize_tensor
DEQUANTIZERS: dict[str, Callable[[QuantizedTensor], torch.Tensor]] = {
    "int8_per_row": _deq_per_row,
    "int8_per_tensor": _deq_per_tensor,
    "int_per_row": _deq_int_per_row,
    "float": _deq_identity,
    "raw": _deq_identity,
}


def dequantize_tensor(qt: QuantizedTensor) -> torch.Tensor:
    out = DEQUANTIZERS[qt.kind](qt)
    return out.to(dtype=dtype_from_name(qt.orig_dtype)).contiguous()


def dequantize_state_dict(qdict: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Rebuild a float state dict (same names and order) from ``qdict``."""
    return {name: dequantize_tensor(qt) for name, qt in qdict.items()}
