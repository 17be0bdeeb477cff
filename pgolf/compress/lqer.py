"""LQER: a low-rank correction of the quantization error of the worst-quantized matrices, as
PR #1855 exports it (BEST:2264-2301, its "asymmetric" form).

After quantization (and GPTQ), every 2-D tensor of more than KEEP_FLOAT_MAX_NUMEL elements stored
as per-row integer codes is a candidate (the record's: its GPTQ'd matrices, not its int8 gates);
the ``top`` with the largest ``||W - W_hat||_F`` (float32, ties: state-dict order) get one. For
each, the SVD of ``E = W - W_hat`` (float32, on the CPU) gives ``A = U_r S_r`` (rows x r) and
``B = V_r^T`` (r x cols), r = min(rank, the SVD's length). A is stored as grouped intN with one
scale for the whole factor, B with one scale per ``group`` consecutive elements
(pgolf.compress.quantizers.groups: the record's INT2 ``max/1.5`` and INT4 ``max/7.5`` for 2 and 4
bits). Where ``group`` does not divide B's size, both factors fall back to per-row symmetric
int``b_bits`` with max-abs scales, as the record does (its ``_lqer_pack``). The factors are two
more entries of the quantized state dict (quant.LQER_A / LQER_B after the tensor's name), so the
container stores them as any tensor and ``quant.dequantize_state_dict`` adds ``A @ B`` back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf.compress.quant import KEEP_FLOAT_MAX_NUMEL, LQER_A, LQER_B, QuantizedTensor
from pgolf.compress.quantizers.registry import get_quantizer
from pgolf.compress.quantizers.groups import quantize_int_group
from pgolf.compress.quantizers.rows import quantize_int_per_row

__all__ = ["LQER_KINDS", "LQERResult", "lqer_candidates", "lqer_factors", "add_lqer"]

# The stored forms LQER corrects: per-row integer codes (what GPTQ and the intN schemes write).
LQER_KINDS = ("int_per_row", "int8_per_row")


@dataclass
class LQERResult:
    qdict: dict[str, QuantizedTensor]  # the input's entries with the factors after their tensors
    errors: dict[str, tuple[float, float]]  # corrected tensor -> (||E||_F before, after)

    def lines(self) -> list[str]:
        parts = [f"{n} {before:.4g} -> {after:.4g}" for n, (before, after) in self.errors.items()]
        return [f"lqer: {len(parts)} tensors, ||W - W_hat||_F: " + ", ".join(parts)] if parts else \
            ["lqer: no tensor stored as per-row integer codes; nothing corrected"]


def _float32(qt: QuantizedTensor) -> torch.Tensor:
    return get_quantizer(qt.kind).dequantize(qt).float()  # before the cast to its dtype, as the reload adds


def _error(w: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    return w.detach().to("cpu").float() - _float32(qt)


def lqer_candidates(state: dict[str, torch.Tensor], qdict: dict[str, QuantizedTensor]) -> dict[str, float]:
    """{name: ||W - W_hat||_F} of every candidate (see the module docstring), in qdict order."""
    return {name: float(_error(state[name], qt).norm()) for name, qt in qdict.items()
            if qt.kind in LQER_KINDS and qt.data.ndim == 2 and qt.data.numel() > KEEP_FLOAT_MAX_NUMEL
            and name in state}


def lqer_factors(err: torch.Tensor, rank: int, a_bits: int = 2, b_bits: int = 4,
                 group: int = 64) -> tuple[QuantizedTensor, QuantizedTensor]:
    """The stored factors (A, B) of a rank-``rank`` correction of the float32 error ``err``."""
    if rank < 1:
        raise ValueError(f"LQER rank must be >= 1, got {rank}")
    U, S, Vh = torch.linalg.svd(err.float(), full_matrices=False)
    r = min(rank, S.numel())
    A = (U[:, :r] * S[:r]).contiguous()
    B = Vh[:r, :].contiguous()
    if B.numel() % group == 0:
        return quantize_int_group(A, a_bits), quantize_int_group(B, b_bits, group)
    return (quantize_int_per_row(A, b_bits, clip_search=False),
            quantize_int_per_row(B, b_bits, clip_search=False))


def add_lqer(state: dict[str, torch.Tensor], qdict: dict[str, QuantizedTensor], rank: int, top: int,
             a_bits: int = 2, b_bits: int = 4, group: int = 64) -> LQERResult:
    """qdict with rank-``rank`` LQER factors for its ``top`` worst-quantized matrices (see the
    module docstring); ``state`` holds the unquantized weights."""
    errors = lqer_candidates(state, qdict)
    chosen = [n for n, _ in sorted(errors.items(), key=lambda kv: -kv[1])[:top]]  # stable: ties keep order
    factors, report = {}, {}
    for name in chosen:
        err = _error(state[name], qdict[name])
        a, b = lqer_factors(err, rank, a_bits, b_bits, group)
        factors[name] = a, b
        fixed = err - _float32(a) @ _float32(b)
        report[name] = (errors[name], float(fixed.norm()))
    out: dict[str, QuantizedTensor] = {}
    for name, qt in qdict.items():
        out[name] = qt
        if name in factors:
            out[name + LQER_A], out[name + LQER_B] = factors[name]
    return LQERResult(out, report)
