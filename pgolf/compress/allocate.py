"""Mixed-bit allocation: choose bits per tensor to fit a byte budget with least damage.

Each allocated tensor ``W`` [rows, cols] can be stored as per-row symmetric intN for N in
``choices``; its estimated size is ``ceil(rows * cols * N / 8) + 2 * rows`` bytes (packed codes
+ fp16 scales), and its *sensitivity* at N bits is an estimate of the damage:

* default: the squared rounding error of per-row intN quantization (with clip search),
  ``sum_ij d_j (W_ij - W_hat_ij)^2``, with ``d`` the Hessian diagonal (mean input squares
  ``diag(X^T X) / rows``, e.g. from :func:`pgolf.compress.gptq.collect_hessians`) when given, else 1;
* or any table ``{name: {bits: value}}`` passed as ``sensitivity``, for instance the measured
  increase of calibration loss from :func:`measured_sensitivity`.

:func:`allocate_bits` minimises the summed sensitivity subject to
``sum bytes + fixed tensors' bytes + overhead <= budget`` (a multiple-choice knapsack).

* ``method="exact"``: a Pareto-frontier dynamic programme over the tensors keeps every
  non-dominated (bytes, sensitivity) partial sum; the answer is optimal for the estimate.
  Same-shaped tensors have the same byte steps, so for real models the frontier stays small.
* ``method="greedy"``: marginal cost. Every tensor starts at its highest bit width; while over
  budget, the tensor whose next cheaper option costs the least sensitivity per byte saved is
  lowered (the next option is the one of least slope, so each tensor walks the lower convex
  hull of its options: the Lagrangian solution); a fill pass then spends leftover bytes on
  the upgrades that buy the most sensitivity per byte, until no single upgrade fits.
* ``method="auto"`` (default): exact, falling back to greedy if the frontier grows past
  ``max_frontier`` points.

Every method never exceeds the budget, and returns all-highest-bits whenever that fits.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
import heapq

import numpy as np
import torch
from torch import Tensor, nn

from pgolf.compress.quantizers.rows import dequantize_rows, qmax_for, quantize_rows

__all__ = ["Allocation", "tensor_bytes", "sensitivity_table", "measured_sensitivity", "allocate_bits"]

FP16 = "fp16"


def tensor_bytes(shape: Sequence[int], bits: int | str) -> int:
    """Estimated stored bytes: ``2 * numel`` for ``"fp16"``, else packed intN codes plus one fp16
    scale per row (rows = shape[0]; a 0-/1-D tensor counts as one row)."""
    numel = math.prod(shape)
    if bits == FP16:
        return 2 * numel
    if not isinstance(bits, int):
        raise ValueError(f"bits must be an int or {FP16!r}, got {bits!r}")
    qmax_for(bits)
    rows = shape[0] if len(shape) >= 2 else 1
    return math.ceil(numel * bits / 8) + 2 * rows


def _weighted_sq_error(w: Tensor, w_hat: Tensor, diag: Tensor | None) -> float:
    err = (w.double() - w_hat.double()).square()
    if diag is not None:
        err = err * diag.double().to(err.device)
    return float(err.sum())


def _check_diag(name: str, w: Tensor, diag: Tensor) -> Tensor:
    if diag.ndim != 1 or diag.numel() != w.shape[-1]:
        raise ValueError(f"hessian_diag[{name!r}] has shape {tuple(diag.shape)}, expected ({w.shape[-1]},)")
    return diag.float().to(w.device)


def _sensitivity(w: Tensor, bits: int | str, diag: Tensor | None) -> float:
    w = w.detach().float()
    if bits == FP16:
        return _weighted_sq_error(w, w.half().float(), diag)
    w2 = w.reshape(w.shape[0], -1) if w.ndim >= 2 else w.reshape(1, -1)
    q, scale = quantize_rows(w2, bits, clip_search=True, col_weight=diag)
    return _weighted_sq_error(w2, dequantize_rows(q, scale), diag)


def sensitivity_table(
    tensors: Mapping[str, Tensor],
    choices: Sequence[int] = (8, 6, 5, 4),
    hessian_diag: Mapping[str, Tensor] | None = None,
) -> dict[str, dict[int, float]]:
    """``{name: {bits: sum_ij d_j (W_ij - W_hat_ij)^2}}`` with per-row intN + clip search;
    ``d`` is ``hessian_diag[name]`` (shape [cols]) when given, else all ones."""
    out: dict[str, dict[int, float]] = {}
    for name, w in tensors.items():
        diag = None
        if hessian_diag is not None and name in hessian_diag:
            diag = _check_diag(name, w, hessian_diag[name])
        out[name] = {b: _sensitivity(w, b, diag) for b in choices}
    return out


@torch.no_grad()
def measured_sensitivity(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    names: Sequence[str],
    choices: Sequence[int] = (8, 6, 5, 4),
) -> dict[str, dict[int, float]]:
    """Measured loss increase ``{name: {bits: loss(quantized) - loss(float)}}`` on calibration
    batches (use training data), quantizing one tensor at a time (per-row intN, clip search);
    negative differences (noise) are clipped to 0. Costs ``len(names) * len(choices) + 1``
    passes over ``batches``; the model's weights and training flag are restored."""
    batches = list(batches)
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"model has no parameter(s) {missing}")
    was_training = model.training
    model.eval()

    def loss() -> float:
        return sum(float(model(x, y)) for x, y in batches) / max(len(batches), 1)

    try:
        base = loss()
        out: dict[str, dict[int, float]] = {}
        for name in names:
            p = params[name]
            original = p.data.clone()
            out[name] = {}
            try:
                for b in choices:
                    q, scale = quantize_rows(original.float(), b, clip_search=True)
                    p.data.copy_(dequantize_rows(q, scale).to(p.dtype))
                    out[name][b] = max(loss() - base, 0.0)
            finally:
                p.data.copy_(original)
        return out
    finally:
        model.train(was_training)


@dataclass
class Allocation:
    """The chosen bits and what they cost. ``bits[name]`` is an int or ``"fp16"``;
    ``total_bytes`` includes fixed tensors and ``overhead_bytes``."""

    bits: dict[str, int | str]
    bytes: dict[str, int]
    sensitivity: dict[str, float]
    shapes: dict[str, tuple[int, ...]]
    fixed: tuple[str, ...]
    budget_bytes: int
    overhead_bytes: int = 0
    choices: tuple[int, ...] = (8, 6, 5, 4)
    method: str = ""
    lowered_steps: int = 0
    filled_steps: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values()) + self.overhead_bytes

    @property
    def total_sensitivity(self) -> float:
        return sum(self.sensitivity[n] for n in self.bits if n not in self.fixed)

    @property
    def slack_bytes(self) -> int:
        return self.budget_bytes - self.total_bytes

    def bits_for(self, name: str) -> int | None:
        """A quant ``bits_for`` policy hook: the int bits chosen for ``name``, None for names not
        allocated and for fp16 passthrough (check ``bits[name] == "fp16"`` for that case)."""
        b = self.bits.get(name)
        return b if isinstance(b, int) else None

    def histogram(self) -> dict[int | str, int]:
        out: dict[int | str, int] = {}
        for b in self.bits.values():
            out[b] = out.get(b, 0) + 1
        return out

    def lines(self) -> list[str]:
        width = max([len("tensor")] + [len(n) for n in self.bits])
        out = [f"{'tensor':<{width}}  {'shape':>12}  {'bits':>4}  {'bytes':>10}  {'sensitivity':>12}"]
        for n, b in self.bits.items():
            shape = "x".join(map(str, self.shapes[n]))
            tag = " (fixed)" if n in self.fixed else ""
            out.append(f"{n:<{width}}  {shape:>12}  {b!s:>4}  {self.bytes[n]:>10,}  "
                       f"{self.sensitivity[n]:>12.5g}{tag}")
        hist = ", ".join(f"{k}-bit: {v}" if isinstance(k, int) else f"{k}: {v}"
                         for k, v in sorted(self.histogram().items(), key=lambda kv: str(kv[0])))
        out.append(f"total {self.total_bytes:,} bytes (incl. overhead {self.overhead_bytes:,}) of budget "
                   f"{self.budget_bytes:,} (slack {self.slack_bytes:,}); sensitivity "
                   f"{self.total_sensitivity:.6g}; {hist}; method: {self.method}")
        out.extend(self.notes)
        return out

    def table(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict:
        """JSON-ready summary for the run ledger."""
        return {
            "bits": dict(self.bits), "bytes": dict(self.bytes), "sensitivity": dict(self.sensitivity),
            "fixed": list(self.fixed), "budget_bytes": self.budget_bytes,
            "overhead_bytes": self.overhead_bytes, "total_bytes": self.total_bytes,
            "total_sensitivity": self.total_sensitivity, "choices": list(self.choices),
            "method": self.method,
        }


Options = dict[str, list[tuple[int, int, float]]]  # name -> [(bits, bytes, sensitivity)], most bits first


def _greedy(options: Options, names: list[str], capacity: int) -> tuple[dict[str, int], tuple[int, int]]:
    """Greedy marginal cost then fill (see module doc); returns option index per name and
    (steps lowered, steps filled)."""
    cur = {n: 0 for n in names}
    total = sum(options[n][0][1] for n in names)

    def next_step(n: str) -> tuple[float, int] | None:
        """(slope, index) of the cheaper option of least sensitivity increase per byte saved."""
        _, by0, s0 = options[n][cur[n]]
        best = None
        for j in range(cur[n] + 1, len(options[n])):
            _, by, s = options[n][j]
            saved = by0 - by
            if saved <= 0:
                continue
            slope = (s - s0) / saved
            if best is None or slope < best[0]:
                best = (slope, j)
        return best

    order = {n: i for i, n in enumerate(names)}
    heap: list[tuple[float, int, str, int]] = []
    for n in names:
        step = next_step(n)
        if step is not None:
            heapq.heappush(heap, (step[0], order[n], n, step[1]))
    lowered = 0
    while total > capacity:
        _, _, n, j = heapq.heappop(heap)  # non-empty: the lowest bits fit (checked by the caller)
        total -= options[n][cur[n]][1] - options[n][j][1]
        cur[n] = j
        lowered += 1
        step = next_step(n)
        if step is not None:
            heapq.heappush(heap, (step[0], order[n], n, step[1]))

    # Fill: spend the slack on the upgrades with most sensitivity removed per byte.
    filled = 0
    while True:
        slack = capacity - total
        best = None
        for n in names:
            _, by0, s0 = options[n][cur[n]]
            for j in range(cur[n]):
                _, by, s = options[n][j]
                extra = by - by0
                if s >= s0 or extra > slack:
                    continue
                gain = (s0 - s) / extra if extra > 0 else math.inf
                if best is None or gain > best[0]:
                    best = (gain, n, j)
        if best is None:
            break
        _, n, j = best
        total += options[n][j][1] - options[n][cur[n]][1]
        cur[n] = j
        filled += 1
    return cur, (lowered, filled)


def _pareto_exact(options: Options, names: list[str], capacity: int,
                  max_frontier: float) -> dict[str, int] | None:
    """Exact multiple-choice knapsack by a Pareto-frontier DP over tensors.

    After each tensor the frontier holds every non-dominated (bytes, sensitivity) partial
    sum whose bytes still leave room for the remaining tensors at their fewest bytes. Tensors
    of equal shape give equal byte steps, so for real models the frontier stays small.
    Returns option indices, or None if the frontier exceeds ``max_frontier`` points."""
    min_rest = np.cumsum([0] + [min(o[1] for o in options[n]) for n in reversed(names)])[::-1]
    fb = np.zeros(1, dtype=np.int64)       # frontier bytes
    fs = np.zeros(1, dtype=np.float64)     # frontier sensitivity
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for t, n in enumerate(names):
        ob = np.array([o[1] for o in options[n]], dtype=np.int64)
        os_ = np.array([o[2] for o in options[n]], dtype=np.float64)
        cb = (fb[:, None] + ob[None, :]).ravel()
        cs = (fs[:, None] + os_[None, :]).ravel()
        parent = np.repeat(np.arange(fb.size), ob.size)
        choice = np.tile(np.arange(ob.size), fb.size)
        ok = cb <= capacity - min_rest[t + 1]
        cb, cs, parent, choice = cb[ok], cs[ok], parent[ok], choice[ok]
        order = np.lexsort((cs, cb))       # by bytes, then sensitivity
        cb, cs, parent, choice = cb[order], cs[order], parent[order], choice[order]
        prev_min = np.minimum.accumulate(np.concatenate(([np.inf], cs[:-1])))
        keep = cs < prev_min               # strictly better than every cheaper point
        fb, fs = cb[keep], cs[keep]
        back.append((parent[keep], choice[keep]))
        if fb.size > max_frontier:
            return None
    idx = int(np.argmin(fs))
    cur: dict[str, int] = {}
    for t in range(len(names) - 1, -1, -1):
        parent, choice = back[t]
        cur[names[t]] = int(choice[idx])
        idx = int(parent[idx])
    return cur


def allocate_bits(
    tensors: Mapping[str, Tensor],
    budget_bytes: int,
    choices: Sequence[int] = (8, 6, 5, 4),
    hessian_diag: Mapping[str, Tensor] | None = None,
    fixed: Mapping[str, int | str] | None = None,
    overhead_bytes: int = 0,
    sensitivity: Mapping[str, Mapping[int, float]] | None = None,
    method: str = "auto",
    max_frontier: int = 200_000,
) -> Allocation:
    """Assign bits in ``choices`` to every 2-D tensor of ``tensors`` not in ``fixed`` so that the
    estimated bytes fit ``budget_bytes`` and the summed sensitivity is small (see module doc).

    ``fixed`` maps names (which must be in ``tensors``) to forced bits or ``"fp16"``; their bytes
    count against the budget. ``hessian_diag`` (shape [cols] per name) weights the error per
    column and, when given, must cover every allocated tensor. ``sensitivity`` overrides the
    estimate with a precomputed ``{name: {bits: value}}`` table covering every allocated tensor
    and choice. Raises ValueError naming the minimum achievable bytes if even the lowest bits
    do not fit.

    ``method``: ``"exact"`` (Pareto-frontier dynamic programme, optimal for the estimate),
    ``"greedy"`` (marginal cost + fill), or ``"auto"``: exact unless the frontier grows past
    ``max_frontier`` points (only for many tensors of unrelated odd sizes), then greedy.
    If every tensor fits at its highest bits, that is the answer whatever the method.
    """
    if method not in ("auto", "exact", "greedy"):
        raise ValueError(f"method must be 'auto', 'exact' or 'greedy', got {method!r}")
    choices = tuple(sorted({int(b) for b in choices}, reverse=True))
    if not choices:
        raise ValueError("choices must name at least one bit width")
    for b in choices:
        qmax_for(b)
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(tensors))
    if unknown:
        raise ValueError(f"fixed names {unknown} are not in tensors; pass their tensors too so their "
                         f"bytes can be counted")
    names = [n for n in tensors if n not in fixed]
    for n in names:
        if tensors[n].ndim != 2:
            raise ValueError(f"{n!r} has shape {tuple(tensors[n].shape)}; only 2-D tensors can be "
                             f"allocated per-row intN bits (put it in `fixed`)")
    if hessian_diag is not None:
        missing = [n for n in names if n not in hessian_diag]
        if missing:
            raise ValueError(f"hessian_diag lacks {missing}; give a diagonal for every allocated tensor "
                             f"or put those tensors in `fixed`")
    if sensitivity is not None:
        missing = [n for n in names if n not in sensitivity or any(b not in sensitivity[n] for b in choices)]
        if missing:
            raise ValueError(f"sensitivity table lacks entries (for every bits in {choices}) of {missing}")

    shapes = {n: tuple(t.shape) for n, t in tensors.items()}

    def diag_of(n: str) -> Tensor | None:
        if hessian_diag is None or n not in hessian_diag:
            return None
        return _check_diag(n, tensors[n], hessian_diag[n])

    # Options per allocated tensor, highest bits first: (bits, bytes, sensitivity).
    options: dict[str, list[tuple[int, int, float]]] = {}
    for n in names:
        d = diag_of(n)
        sens = ({b: float(sensitivity[n][b]) for b in choices} if sensitivity is not None
                else {b: _sensitivity(tensors[n], b, d) for b in choices})
        options[n] = [(b, tensor_bytes(shapes[n], b), sens[b]) for b in choices]

    out_bits: dict[str, int | str] = {}
    out_bytes: dict[str, int] = {}
    out_sens: dict[str, float] = {}
    for n, b in fixed.items():
        if b != FP16:
            b = int(b)
        out_bytes[n] = tensor_bytes(shapes[n], b)
        out_bits[n] = b
        if sensitivity is not None and n in sensitivity and b in sensitivity[n]:
            out_sens[n] = float(sensitivity[n][b])
        else:
            out_sens[n] = _sensitivity(tensors[n], b, diag_of(n))
    fixed_bytes = sum(out_bytes.values())

    base = fixed_bytes + int(overhead_bytes)
    min_total = base + sum(min(o[1] for o in options[n]) for n in names)
    if min_total > budget_bytes:
        raise ValueError(
            f"cannot fit the budget of {budget_bytes:,} bytes: the minimum achievable is {min_total:,} "
            f"bytes (every allocated tensor at {choices[-1]} bits; fixed tensors {fixed_bytes:,} bytes, "
            f"overhead {int(overhead_bytes):,} bytes); raise the budget, allow fewer bits or fix fewer "
            f"tensors at high precision")

    capacity = int(budget_bytes) - base  # bytes left for the allocated tensors
    if sum(options[n][0][1] for n in names) <= capacity:
        cur, used, steps = {n: 0 for n in names}, "all highest bits fit", (0, 0)
    else:
        cur = None
        if method in ("auto", "exact"):
            cur = _pareto_exact(options, names, capacity, math.inf if method == "exact" else max_frontier)
            used, steps = "exact (Pareto-frontier DP)", (0, 0)
        if cur is None:
            cur, steps = _greedy(options, names, capacity)
            used = "greedy marginal cost (convex hull) + fill"
    total = base + sum(options[n][cur[n]][1] for n in names)

    for n in tensors:  # report in the tensors' order
        if n in options:
            b, by, s = options[n][cur[n]]
            out_bits[n], out_bytes[n], out_sens[n] = b, by, s
    ordered = list(tensors)
    alloc = Allocation(
        bits={n: out_bits[n] for n in ordered}, bytes={n: out_bytes[n] for n in ordered},
        sensitivity={n: out_sens[n] for n in ordered}, shapes=shapes, fixed=tuple(fixed),
        budget_bytes=int(budget_bytes), overhead_bytes=int(overhead_bytes), choices=choices,
        method=used, lowered_steps=steps[0], filled_steps=steps[1],
    )
    if alloc.total_bytes != total or total > budget_bytes:  # internal invariant
        raise RuntimeError(f"allocator bug: {alloc.total_bytes} / {total} bytes vs budget {budget_bytes}")
    return alloc
