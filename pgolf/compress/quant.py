"""Post-training quantization of a state dict for export.

The default scheme, ``"int8"``, reproduces the official parameter-golf export
numerics exactly (``quantize_state_dict_int8`` in openai/parameter-golf
``train_gpt.py``):

* non-float tensors are passed through unchanged (kind ``"raw"``);
* float tensors with at most ``KEEP_FLOAT_MAX_NUMEL`` elements are kept as float
  (kind ``"float"``): control tensors (name contains one of ``CONTROL_PATTERNS``, or,
  for pgolf's models, their role says fp32) as fp32, other fp32/bf16 tensors stored as
  fp16 and cast back to their original dtype on load, any other float dtype unchanged;
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
stored (see ``quantize_rows``); ``clip_rule="percentile"`` uses PR #549's rule instead
(``percentile_scales``: one quantile of each row's |w| for the whole tensor, by whole-tensor
MSE, scale floor 1/qmax); ``clip_rule="sdclip"`` uses PR #1855's SDClip (``sdclip_scales``:
``k * std(row) / qmax``, k per tensor from ``sdclip_k``, no search). Under a scheme narrower
than int8, embedding tables and an untied head (roles whose export treatment is "int8", or
without roles names containing one of ``EMBEDDING_PATTERNS``) keep the official int8, as the
records do, unless the policy names them. Whatever the scheme or policy, non-float tensors stay
raw and float tensors of at most ``KEEP_FLOAT_MAX_NUMEL`` elements follow the official passthrough rules above (with
``controls="fp16"`` the control tensors are stored fp16 too, as PR #549); only
larger float tensors are quantized (or kept as fp16/fp32 when the policy says so). Bit
packing lives in ``pgolf.compress.packing`` and is the artifact's business; in memory one code is
one int8.

A role treatment of ``"int8_row"`` (PR #1855's attention gates, export.attn_gate_int8) stores a
2-D float tensor of any size as per-row int8 with the max-abs scale (``max|row| / 127``). LQER
corrections (pgolf.compress.lqer) are two extra entries next to the tensor they correct, named
``name + LQER_A`` and ``name + LQER_B``; ``dequantize_state_dict`` adds their product to it.

Each storage kind is an entry of the quantizer registry (``pgolf.compress.quantizers``: its
quantize and dequantize functions and format label); this module decides which kind each
tensor of a state dict gets. ``KINDS`` lists that registry's kinds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch

from pgolf.compress.quantizers.official_int8 import CLIP_PERCENTILE, quantize_int8_per_row, quantize_int8_per_tensor
from pgolf.compress.quantizers.passthrough import FLOAT_SPECS, quantize_float, quantize_raw
from pgolf.compress.quantizers.registry import (QUANTIZERS, QuantizedTensor, dtype_from_name, dtype_name,
                                                format_label, get_quantizer)
from pgolf.compress.quantizers.rows import (CLIP_RULES, DEFAULT_CLIP_GRID, MAX_BITS, MIN_BITS, dequantize_rows,
                                            qmax_for, quantization_error, quantize_int_per_row, quantize_rows)

__all__ = [
    "CONTROL_PATTERNS", "KEEP_FLOAT_MAX_NUMEL", "CLIP_PERCENTILE", "KINDS",
    "QuantizedTensor", "QuantStats", "SCHEMES",
    "is_control_tensor", "quantize_tensor_int8", "quantize_state_dict",
    "dequantize_tensor", "dequantize_state_dict", "dtype_name", "dtype_from_name",
    "MIN_BITS", "MAX_BITS", "FLOAT_SPECS", "DEFAULT_CLIP_GRID", "BitsSpec", "BitsFor",
    "qmax_for", "quantize_rows", "dequantize_rows", "quantization_error", "quantize_tensor",
    "policy_bits", "check_bits_spec", "CLIP_RULES", "EMBEDDING_PATTERNS", "CONTROLS",
    "SDCLIP_K", "sdclip_group", "LQER_A", "LQER_B",
]

# The official export's control tensors (train_gpt.py's CONTROL_TENSOR_NAME_PATTERNS): small float
# tensors kept in fp32 when no role says otherwise. pgolf's own models pass their parameters'
# roles (pgolf.model.roles.export_treatment), which pick the same tensors for the baseline.
CONTROL_PATTERNS: tuple[str, ...] = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")
KEEP_FLOAT_MAX_NUMEL = 65_536
# Tensors without a role that stay int8 under a narrower scheme (PR #549's "embed" category).
EMBEDDING_PATTERNS: tuple[str, ...] = ("tok_emb", "lm_head")
CONTROLS = ("fp32", "fp16")  # how small control tensors are stored: fp32 (official) or fp16 (PR #549)

KINDS = tuple(sorted(QUANTIZERS))  # the registered storage kinds

# SDClip's k per tensor group, PR #1855's tuned values (its other matrices: the code's default).
SDCLIP_K: dict[str, float] = {"mlp": 11.5, "attn": 13.0, "embed": 14.0, "other": 12.85}
# The names of an LQER correction's factors: the corrected tensor's name plus these. "@" is in no
# parameter name (module attribute names are identifiers).
LQER_A, LQER_B = "@lqer_a", "@lqer_b"


def sdclip_group(name: str) -> str:
    """The SDClip group of a tensor by its name, as the record decides it (BEST:2251-2258):
    "embed" (EMBEDDING_PATTERNS), "mlp" (".mlp."), "attn" (".attn."), else "other". The export
    decides by the parameters' roles instead (pgolf.compress.policy), with the same result for
    pgolf's models."""
    if any(p in name for p in EMBEDDING_PATTERNS):
        return "embed"
    return "mlp" if ".mlp." in name else "attn" if ".attn." in name else "other"


BitsSpec = Union[int, str, None]  # N in [MIN_BITS, MAX_BITS], "fp16", "fp32", or None (= default)
BitsFor = Callable[[str, torch.Tensor], BitsSpec]


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


def is_control_tensor(name: str) -> bool:
    return any(p in name for p in CONTROL_PATTERNS)


def quantize_tensor_int8(name: str, t: torch.Tensor, keep_fp32: bool | None = None) -> QuantizedTensor:
    """Quantize one tensor with the official int8 rules (see module docstring). ``keep_fp32``:
    whether a small float tensor stays fp32 (None: the official name patterns decide)."""
    t = t.detach().to("cpu").contiguous()
    if not t.is_floating_point():
        return quantize_raw(t)
    if t.numel() <= KEEP_FLOAT_MAX_NUMEL:
        if is_control_tensor(name) if keep_fp32 is None else keep_fp32:
            return quantize_float(t.float(), "fp32")
        return quantize_float(t)
    return quantize_int8_per_row(t) if t.ndim == 2 else quantize_int8_per_tensor(t)


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


def quantize_tensor(name: str, t: torch.Tensor, bits: BitsSpec = None, clip_search: bool = True,
                    grid: Sequence[float] | None = None, keep_fp32: bool | None = None,
                    clip_rule: str = "row_search", sdclip_k: float | None = None) -> QuantizedTensor:
    """Quantize one tensor with an explicit spec. Non-float tensors and float tensors of at
    most ``KEEP_FLOAT_MAX_NUMEL`` elements follow the official rules whatever ``bits`` is;
    otherwise ``bits=None`` is the official int8, an int N is per-row intN
    (``quantize_rows``; tensors that are not 2-D use their first dim as rows, 1-D ones
    are one row), "fp16"/"fp32" keep the tensor as that float (dequantized back to its
    dtype). ``keep_fp32`` as in quantize_tensor_int8; ``clip_rule`` and ``sdclip_k`` as in
    quantize_int_per_row (the k defaults to SDCLIP_K of the name's sdclip_group)."""
    check_bits_spec(bits)
    t = t.detach()
    if bits is None or not t.is_floating_point() or t.numel() <= KEEP_FLOAT_MAX_NUMEL:
        return quantize_tensor_int8(name, t, keep_fp32)
    if bits in FLOAT_SPECS:
        return quantize_float(t, bits)
    if clip_rule == "sdclip" and sdclip_k is None:
        sdclip_k = SDCLIP_K[sdclip_group(name)]
    return quantize_int_per_row(t, bits, clip_search=clip_search, grid=grid, clip_rule=clip_rule, sdclip_k=sdclip_k)


# scheme name -> bits of the large 2-D float tensors; "int8" is the official export
SCHEMES: dict[str, int] = {"int8": 8, "int6": 6, "int5": 5, "int4": 4}


def _format_of(qt: QuantizedTensor) -> str:
    return format_label(qt.kind, qt.bits, dtype_name(qt.data.dtype))


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor], scheme: str = "int8", bits_for: BitsFor | None = None,
    clip_search: bool | None = None, grid: Sequence[float] | None = None,
    roles: Mapping[str, str] | None = None, clip_rule: str = "row_search", controls: str = "fp32",
    sdclip_k: Callable[[str], float] | None = None,
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
    official int8 where it applies). ``clip_rule`` ("row_search" | "percentile" | "sdclip") is the
    clip of per-row intN (quantize_int_per_row); under "sdclip", ``sdclip_k(name)`` gives each
    tensor's k (None: SDCLIP_K by sdclip_group).

    ``roles``: {parameter name: "scheme" | "int8" | "fp32" | "fp16"} from the parameters' roles
    (pgolf.model.roles.export_treatment, or "int8_row": a 2-D float tensor of any size stored as
    per-row int8 with max-abs scales, as PR #1855's attention gates): a small float tensor stays
    fp32 when its role says "fp32" and is stored as fp16 otherwise; a large 2-D one whose role says "int8" (embedding
    tables, an untied head) gets the int8 scheme's default whatever ``scheme`` is, unless
    ``bits_for`` decides. Tensors without a role (buffers, a second name of a shared parameter)
    and every tensor when ``roles`` is None follow the name patterns (CONTROL_PATTERNS,
    EMBEDDING_PATTERNS). ``controls="fp16"`` stores every small float tensor as fp16, the
    controls too (PR #549); "fp32" is the official rule."""
    try:
        default_bits = SCHEMES[scheme]
    except KeyError:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {sorted(SCHEMES)}") from None
    for key, value, options in (("clip_rule", clip_rule, CLIP_RULES), ("controls", controls, CONTROLS)):
        if value not in options:
            raise ValueError(f"{key} must be one of {', '.join(options)}, got {value!r}")
    official = clip_search is not True  # the int8 default is the official int8
    search = clip_search is not False
    out: dict[str, QuantizedTensor] = {}
    stats = QuantStats()
    for name, tensor in state_dict.items():
        spec: BitsSpec = None
        if bits_for is not None and tensor.is_floating_point() and tensor.numel() > KEEP_FLOAT_MAX_NUMEL:
            spec = check_bits_spec(bits_for(name, tensor), f"bits_for({name!r})")
        role = roles.get(name) if roles is not None else None
        if spec is None and tensor.ndim == 2:
            int8 = role == "int8" or (role is None and any(p in name for p in EMBEDDING_PATTERNS))
            spec = (None if official else 8) if scheme == "int8" or int8 else default_bits
        keep_fp32 = False if controls == "fp16" else None if role is None else role == "fp32"
        if role == "int8_row" and tensor.is_floating_point() and tensor.ndim == 2:
            qt = quantize_int_per_row(tensor, 8, clip_search=False)  # max|row| / 127, whatever its size
        else:
            qt = quantize_tensor(name, tensor, spec, clip_search=search, grid=grid, keep_fp32=keep_fp32,
                                 clip_rule=clip_rule, sdclip_k=None if sdclip_k is None else sdclip_k(name))
        out[name] = qt
        stats.param_count += tensor.numel()
        stats.num_tensors += 1
        stats.baseline_bytes += tensor.numel() * tensor.element_size()
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


def dequantize_tensor(qt: QuantizedTensor) -> torch.Tensor:
    out = get_quantizer(qt.kind).dequantize(qt)
    return out.to(dtype=dtype_from_name(qt.orig_dtype)).contiguous()


def dequantize_state_dict(qdict: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Rebuild a float state dict (same names and order, LQER factors left out) from ``qdict``.
    A tensor with an LQER correction is ``W_hat + A @ B`` in float32 (A, B its dequantized
    factors), then cast to its dtype, as PR #1855 reloads it (BEST:2330-2340)."""
    factors = [n for n in qdict if n.endswith((LQER_A, LQER_B))]
    for name in factors:
        base = name[:-len(LQER_A if name.endswith(LQER_A) else LQER_B)]
        if base not in qdict or (base + LQER_A) not in qdict or (base + LQER_B) not in qdict:
            raise ValueError(f"LQER factor {name!r} needs both factors and the tensor {base!r} it corrects")
    out = {}
    for name, qt in qdict.items():
        if factors and name.endswith((LQER_A, LQER_B)):
            continue
        if not factors or name + LQER_A not in qdict:
            out[name] = dequantize_tensor(qt)
            continue
        a, b = (get_quantizer(f.kind).dequantize(f) for f in (qdict[name + LQER_A], qdict[name + LQER_B]))
        w = get_quantizer(qt.kind).dequantize(qt).float()
        out[name] = (w + a @ b).to(dtype=dtype_from_name(qt.orig_dtype)).contiguous()
    return out
