"""Full GPTQ (Frantar et al., 2022) for per-row symmetric intN weights.

Pipeline::

    batches = calibration_batches(train_files, seq_len, n_seqs, device)  # TRAINING shards only
    hessians = collect_hessians(model, batches)        # H = X^T X / rows, per CastedLinear
                                                       # (embedding=True: + the tied embedding's)
    result = gptq_state_dict(model, hessians, bits_for=lambda name: 6)
    result.tensors[name] -> (q int8 [rows, cols], scale fp16 [rows], bits)

Storage format: the per-row intN of ``pgolf.compress.quantizers.rows`` (``w ~= q * scale[:, None]``,
int8 codes in ``[-(2^(N-1) - 1), 2^(N-1) - 1]``, one fp16 scale per row rounded *before* the codes
are computed). Scales, clip search and rounding all come from there; this module only decides
the codes column by column.

GPTQ keeps each row's scale fixed up front (from the weights, optionally with a clip search)
and only chooses the integer codes: it quantizes one column at a time and pushes that
column's rounding error onto the columns not yet quantized, weighted by the inverse
Hessian, so the layer *output* error ``||X W^T - X W_hat^T||^2 = tr(E H E^T)`` is what is
minimised rather than the plain weight error. Columns are processed in blocks with a lazy
(batched) update of the later columns; ``act_order`` quantizes columns of large Hessian
diagonal first.

Legality: the calibration data come from the training shards (``calibration_batches``
refuses validation files) or from the model itself (``generated_batches``, which reads no data),
and the seconds spent are returned so a caller can charge them to the training wall-clock budget
(pgolf.train.calibration: export.gptq_calibration).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pgolf.compress.quantizers.rows import (DEFAULT_CLIP_GRID, MIN_SCALE, dequantize_rows, fp16_scale, qmax_for,
                                            quantize_rows, round_codes, row_scales)
from pgolf.data.shards import TokenStream, _as_files
from pgolf.model.layers import CastedLinear

__all__ = [
    "MIN_SCALE", "CLIP_GRID", "GPTQStats", "GPTQResult",
    "qmax_for", "row_scales", "quantize_rows", "dequantize_rows", "hessian_error",
    "calibration_batches", "generated_batches", "calibrate", "collect_hessians", "gptq_quantize", "gptq_state_dict",
]

# GPTQ's scales start from the export's clip search (the same grid), so with an identity
# Hessian GPTQ reproduces the plain export exactly.
CLIP_GRID = DEFAULT_CLIP_GRID


def hessian_error(w: Tensor, w_hat: Tensor, H: Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``: the summed squared output error per input row."""
    e = (w.double() - w_hat.double().to(w.device))
    return float(((e @ H.double().to(e.device)) * e).sum())


# ---------------------------------------------------------------------------
# Calibration data and Hessians
# ---------------------------------------------------------------------------

def _is_validation_file(path: Path) -> bool:
    stem = path.name.lower()
    return "_val_" in stem or stem.startswith("val_") or "_val." in stem or "validation" in stem


def calibration_batches(
    train_files: str | os.PathLike | Sequence[str | os.PathLike],
    seq_len: int,
    n_seqs: int,
    device: str | torch.device = "cpu",
    *,
    batch_seqs: int = 8,
    skip_tokens: int = 0,
    vocab_size: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """``n_seqs`` sequences of ``(x, y)`` (int64 ``[b, seq_len]``, y = x shifted by one) drawn
    contiguously from the TRAINING shards through ``pgolf.data.shards.TokenStream``, grouped into
    batches of at most ``batch_seqs`` sequences.

    GPTQ calibration must never see validation data: any file whose name marks it as a
    validation shard (``*_val_*``, ``val_*``, ``*validation*``) is refused. ``skip_tokens``
    starts the draw further into the stream (e.g. past what training consumed)."""
    if seq_len <= 0 or n_seqs <= 0 or batch_seqs <= 0 or skip_tokens < 0:
        raise ValueError(f"need seq_len, n_seqs, batch_seqs > 0 and skip_tokens >= 0, got "
                         f"{seq_len}, {n_seqs}, {batch_seqs}, {skip_tokens}")
    files = _as_files(train_files)
    bad = [str(f) for f in files if _is_validation_file(f)]
    if bad:
        raise ValueError(f"GPTQ calibration must use training shards only, but got validation "
                         f"file(s) {bad}; pass the train pattern (e.g. fineweb_train_*.bin)")
    stream = TokenStream(files, vocab_size=vocab_size)
    if skip_tokens:
        stream.take(skip_tokens)
    tokens = torch.from_numpy(stream.take(n_seqs * seq_len + 1).astype(np.int64))
    x_all = tokens[:-1].view(n_seqs, seq_len)
    y_all = tokens[1:].view(n_seqs, seq_len)
    device = torch.device(device)
    return [(x_all[i:i + batch_seqs].to(device), y_all[i:i + batch_seqs].to(device))
            for i in range(0, n_seqs, batch_seqs)]


@torch.no_grad()
def generated_batches(model: nn.Module, n_seqs: int, seq_len: int, vocab_size: int,
                      device: str | torch.device = "cpu", *, seed: int = 0, temperature: float = 0.8,
                      batch_seqs: int = 8, gen_seqs: int = 64) -> list[tuple[Tensor, Tensor]]:
    """``n_seqs`` sequences sampled from ``model`` itself, grouped as ``calibration_batches``: no
    data is read (the 1.1147 record's calibration). Each starts from a uniformly random token and
    grows one token at a time at ``temperature`` (no KV cache: ``gen_seqs`` sequences per pass).
    Seeded by ``seed``, apart from the global RNG: the same weights give the same text."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training, rows = model.training, []
    model.eval()
    try:
        for i in range(0, n_seqs, gen_seqs):
            ids = torch.randint(0, vocab_size, (min(gen_seqs, n_seqs - i), 1), device=device, generator=gen)
            for _ in range(seq_len):
                probs = torch.softmax(model.logits(ids)[:, -1].float() / temperature, dim=-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
            rows.append(ids)
    finally:
        model.train(was_training)
    tokens = torch.cat(rows)
    return [(tokens[i:i + batch_seqs, :-1], tokens[i:i + batch_seqs, 1:]) for i in range(0, n_seqs, batch_seqs)]


def calibrate(model: nn.Module, cfg, train_files, device: torch.device) -> tuple[dict[str, Tensor], float, str]:
    """(Hessians, seconds, log line) of GPTQ and the allocator as a pgolf Config asks: from
    export.gptq_seqs sequences of the training stream's start, or sampled from the model
    (export.gptq_calibration=self_generated, seeded by train.seed). The seconds include reading
    or sampling, the device synchronised."""
    e, t, start = cfg.export, cfg.train, time.perf_counter()
    generated = e.gptq_calibration == "self_generated"
    if generated:
        batches = generated_batches(model, e.gptq_seqs, t.train_seq_len, cfg.model.vocab_size, device, seed=t.seed)
    else:
        batches = calibration_batches(train_files, t.train_seq_len, e.gptq_seqs, device,
                                      vocab_size=cfg.model.vocab_size)
    # export.gptq_embedding: an untied head is a CastedLinear and has its Hessian anyway
    hessians = collect_hessians(model, batches, embedding=e.gptq_embedding and cfg.model.tie_embeddings)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return hessians, seconds, (f"calibration: {e.gptq_seqs} {'self-generated' if generated else 'training'} "
                               f"sequences, {len(hessians)} Hessians in {seconds:.2f} s")


EMBEDDING_WEIGHT = "tok_emb.weight"  # the tied embedding's name; its Hessian is the head's input's


def _tied_head(model: nn.Module) -> bool:
    return getattr(model, "lm_head", False) is None and hasattr(model, "tok_emb") and hasattr(model, "hidden_states")


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """weight name -> module, for every CastedLinear of ``model``."""
    return {f"{mname}.weight" if mname else "weight": m
            for mname, m in model.named_modules() if isinstance(m, CastedLinear)}


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    names: list[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    all_reduce: bool = False,
    embedding: bool = False,
) -> dict[str, Tensor]:
    """``H = sum_batches X^T X / (number of input rows)`` for each CastedLinear's input X, and
    with ``embedding`` for the tied embedding too (``EMBEDDING_WEIGHT``): X is then the head's
    input, the final RMSNorm's output (``model.hidden_states``), as PR #1855 (BEST:2116-2133). An
    untied head is a CastedLinear and has its Hessian anyway; a model without a tied head is refused.

    Keys are the layers' weight names as in ``model.state_dict()`` (e.g.
    ``"blocks.0.attn.c_q.weight"``); ``names`` restricts the layers. H is ``[in, in]`` in
    ``dtype`` on the layer's device. The model runs under ``torch.no_grad`` in eval mode
    (its training flag is restored) and every hook is removed afterwards, even on error.
    A layer called several times per forward (depth recurrence) accumulates every call.
    With ``all_reduce`` and an initialised process group, sums and row counts are summed
    over ranks, so each rank may feed different calibration batches.
    """
    modules: dict[str, nn.Module | None] = dict(_linear_modules(model))
    if embedding:
        if not _tied_head(model):
            raise ValueError("the embedding's Hessian (export.gptq_embedding) needs a model whose head is its tied "
                             "embedding (model.tie_embeddings=true); an untied head has its own Hessian")
        modules[EMBEDDING_WEIGHT] = None  # hooked through hidden_states below
    if names is not None:
        missing = sorted(set(names) - set(modules))
        if missing:
            raise KeyError(f"no CastedLinear with weight name(s) {missing}; known: {sorted(modules)}")
        modules = {n: modules[n] for n in names}
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {n: 0 for n in modules}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(dtype)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
            sums[name].addmm_(x.T, x)
            rows[name] += x.shape[0]
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items() if m is not None]
    if EMBEDDING_WEIGHT in modules and modules[EMBEDDING_WEIGHT] is None:
        # The final norm is a function, not a module: wrap the model's hidden_states (the head's
        # input) on the instance for the calibration, and remove the wrapper afterwards.
        inner, record = model.hidden_states, make_hook(EMBEDDING_WEIGHT)

        def hidden_states(*args, **kwargs):
            out = inner(*args, **kwargs)
            record(None, (out,), None)
            return out

        model.hidden_states = hidden_states
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            model(x, y)
    finally:
        for h in handles:
            h.remove()
        model.__dict__.pop("hidden_states", None)
        model.train(was_training)

    if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
        for name in modules:
            dev = sums[name].device if name in sums else next(model.parameters()).device
            if name not in sums:  # this rank saw no input for the layer
                cols = (model.tok_emb if modules[name] is None else modules[name]).weight.shape[1]
                sums[name] = torch.zeros(cols, cols, dtype=dtype, device=dev)
            torch.distributed.all_reduce(sums[name])
            count = torch.tensor([rows[name]], dtype=torch.float64, device=dev)
            torch.distributed.all_reduce(count)
            rows[name] = int(count.item())

    unseen = [n for n in modules if rows[n] == 0]
    if unseen:
        raise ValueError(f"layers {unseen} received no input during calibration; "
                         f"pass at least one batch that runs through them")
    return {n: sums[n] / rows[n] for n in modules}


# ---------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------

@dataclass
class GPTQStats:
    bits: int
    shape: tuple[int, int]
    damp: float             # relative damping finally used (may exceed the requested one)
    dead_columns: int
    act_order: bool
    error_gptq: float       # tr(E H E^T), E = W - W_hat, with the undamped H
    error_naive: float      # the same for round-to-nearest with the same scales
    seconds: float

    @property
    def ratio(self) -> float:
        """error_gptq / error_naive (< 1 means GPTQ helped)."""
        return self.error_gptq / self.error_naive if self.error_naive > 0 else 1.0


def _inverse_hessian_factor(H: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + d * mean(diag H) * I)^-1, in float64.

    If the factorisation fails (H not positive definite numerically), the damping is raised
    tenfold, from at least 1e-3, up to 10 times the mean diagonal."""
    mean_diag = float(H.diagonal().mean())
    if not math.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = 1.0
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    tries = [damp] + [max(damp, 1e-3) * 10 ** k for k in range(1, 5)]
    for d in tries:
        L, info = torch.linalg.cholesky_ex(H + (d * mean_diag) * eye)
        if int(info) != 0:
            continue
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            return U, d
    raise ValueError(f"GPTQ: Hessian is not positive definite even with damping {tries[-1]} x "
                     f"mean(diag); check the calibration statistics for NaN/inf")


@torch.no_grad()
def gptq_quantize(
    w: Tensor,
    H: Tensor,
    bits: int,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip_search: bool = True,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, GPTQStats]:
    """GPTQ-quantize ``w`` [rows, cols] given the input Hessian ``H`` [cols, cols].

    Returns ``(q, scale, stats)``: int8 codes in ``[-qmax, qmax]`` (qmax = 2^(bits-1) - 1),
    one fp16 scale per row (``w ~= q * scale[:, None]``), and a :class:`GPTQStats` comparing
    the Hessian-weighted error with naive rounding under the same scales.

    Steps: columns whose H diagonal is 0 ("dead": their input is always 0) get diagonal 1 and
    weight 0; per-row scales are fixed from these weights (clip search minimising the plain
    reconstruction error when ``clip_search``); H's diagonal is damped by ``damp * mean(diag)``;
    with ``act_order`` columns go in descending diag(H) order (undone at the end); then each
    block of ``block_size`` columns is quantized column by column with the rounding error
    spread over the block's remaining columns through the upper Cholesky factor of H^-1, and
    the block's accumulated error is applied to all later columns in one matmul.

    ``scale`` (shape [rows]) overrides the scale choice, e.g. with another quantizer's clip
    search; it is rounded to fp16 and used as is.
    """
    t0 = time.perf_counter()
    if w.ndim != 2:
        raise ValueError(f"GPTQ needs a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight columns {cols}")
    if block_size <= 0 or damp < 0:
        raise ValueError(f"need block_size > 0 and damp >= 0, got {block_size}, {damp}")
    qmax = qmax_for(bits)
    device = w.device
    W = w.detach().float().clone()
    H_orig = H.detach().to(device=device, dtype=torch.float64)
    H64 = H_orig.clone()

    dead = H64.diagonal() == 0
    H64[dead, dead] = 1.0
    W[:, dead] = 0.0
    if scale is None:
        scale = row_scales(W, bits, clip_search)       # fp16 values, float32 tensor
    elif tuple(scale.shape) != (rows,):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected ({rows},)")
    scale = fp16_scale(scale.detach().to(device).float())

    perm = None
    if act_order:
        perm = torch.argsort(H64.diagonal(), descending=True, stable=True)
        W = W[:, perm]
        H64 = H64[perm][:, perm]

    U, used_damp = _inverse_hessian_factor(H64, damp)
    Hinv = U.float()
    Q = torch.zeros_like(W)
    s = scale[:, None]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i:i + 1]
            q = round_codes(col, scale, qmax)
            Q1[:, i:i + 1] = q
            err = (col - q * s) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        Q[:, i1:i2] = Q1
        if i2 < cols:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    q_codes = Q.to(torch.int8)
    scale16 = scale.half()

    w_ref = w.detach().float()
    naive_q, _ = quantize_rows(torch.where(dead[None, :], 0.0, w_ref), bits, scale=scale)
    stats = GPTQStats(
        bits=bits, shape=(rows, cols), damp=used_damp, dead_columns=int(dead.sum()),
        act_order=act_order,
        error_gptq=hessian_error(w_ref, dequantize_rows(q_codes, scale16), H_orig),
        error_naive=hessian_error(w_ref, dequantize_rows(naive_q, scale16), H_orig),
        seconds=time.perf_counter() - t0,
    )
    return q_codes, scale16, stats


@dataclass
class GPTQResult:
    """What :func:`gptq_state_dict` produced.

    ``tensors[name] = (q int8 [rows, cols], scale fp16 [rows], bits)`` on CPU; ``seconds`` is the
    wall-clock time of the quantization (charge it, plus Hessian collection, to the training
    budget when the rules ask for it)."""

    tensors: dict[str, tuple[Tensor, Tensor, int]] = field(default_factory=dict)
    stats: dict[str, GPTQStats] = field(default_factory=dict)
    seconds: float = 0.0

    def dequantized(self) -> dict[str, Tensor]:
        return {n: dequantize_rows(q, s) for n, (q, s, _) in self.tensors.items()}

    def lines(self) -> list[str]:
        out = [f"{'tensor':<40} {'shape':>12} {'bits':>4} {'err_gptq':>11} {'err_naive':>11} {'ratio':>6}"]
        for n, st in self.stats.items():
            shape = "x".join(map(str, st.shape))
            out.append(f"{n:<40} {shape:>12} {st.bits:>4} {st.error_gptq:>11.4g} "
                       f"{st.error_naive:>11.4g} {st.ratio:>6.3f}")
        out.append(f"GPTQ: {len(self.tensors)} tensors in {self.seconds:.2f}s")
        return out


def gptq_state_dict(
    model: nn.Module | dict[str, Tensor],
    hessians: dict[str, Tensor],
    bits_for: Callable[[str], int | None],
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip_search: bool = True,
    scales: dict[str, Tensor] | None = None,
) -> GPTQResult:
    """GPTQ-quantize every 2-D float weight that has a Hessian and for which ``bits_for(name)``
    is an int; everything else (``bits_for`` None, no Hessian, not 2-D) is left to the caller's
    ordinary export path. ``scales[name]``, where given, fixes that weight's per-row scales
    (gptq_quantize's ``scale``). Runs on each weight's device; results are moved to CPU."""
    t0 = time.perf_counter()
    state = model.state_dict() if isinstance(model, nn.Module) else model
    result = GPTQResult()
    for name, H in hessians.items():
        if name not in state:
            raise KeyError(f"Hessian for {name!r} but the state dict has no such tensor")
        w = state[name]
        if w.ndim != 2 or not w.is_floating_point():
            continue
        bits = bits_for(name)
        if bits is None:
            continue
        q, scale, st = gptq_quantize(w, H, int(bits), block_size=block_size, damp=damp, act_order=act_order,
                                     clip_search=clip_search, scale=(scales or {}).get(name))
        result.tensors[name] = (q.cpu(), scale.cpu(), int(bits))
        result.stats[name] = st
    result.seconds = time.perf_counter() - t0
    return result
