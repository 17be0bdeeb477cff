"""The 1.06108 record's Muon variants (optim.muon_ns=polar_express, optim.muon_row_norm) against
float64 references written from their definitions, in the per-matrix and batched paths.
Parallel Muon on 2 gloo ranks: tests/train/test_parallel_muon.py."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from pgolf.config import ConfigError, ModelConfig, OptimConfig
from pgolf.config.resolve import resolve_config
from pgolf.model.gpt import GPT
from pgolf.train.muon import NS_COEFFS, Muon, orthogonalize
from pgolf.train.optim import build_optimizers

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# The record's (a, b, c) per iteration (pr1855 train_gpt.py, _PE_COEFFS), typed in independently.
RECORD_PE = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
PE = partial(orthogonalize, coeffs=tuple(RECORD_PE))
SHAPES = [(24, 8), (8, 24), (16, 16), (48, 32)]


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ns_reference(g: torch.Tensor, coeffs: list[tuple[float, float, float]]) -> torch.Tensor:
    """X <- G / (||G||_F + 1e-7) on the wide orientation, then X <- aX + b(XX^T)X + c(XX^T)^2 X
    with iteration i's (a, b, c)."""
    tall = g.shape[0] > g.shape[1]
    x = (g / (torch.linalg.matrix_norm(g) + 1e-7)).to(torch.float64)
    x = x.mT if tall else x
    for a, b, c in coeffs:
        s = x @ x.mT
        x = a * x + b * (s @ x) + c * (s @ (s @ x))
    return x.mT if tall else x


# --- Polar Express ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_polar_express_is_the_per_iteration_iteration(shape):
    g = randn(*shape, seed=3)
    assert torch.allclose(PE(g, 5, torch.float64), ns_reference(g, RECORD_PE), rtol=1e-10, atol=1e-12)
    # Fewer steps take the first tuples; more repeat the last one.
    assert torch.allclose(PE(g, 3, torch.float64), ns_reference(g, RECORD_PE[:3]), rtol=1e-10, atol=1e-12)
    assert torch.allclose(PE(g, 7, torch.float64), ns_reference(g, RECORD_PE + RECORD_PE[-1:] * 2),
                          rtol=1e-10, atol=1e-12)
    # The default is still the classic fixed quintic.
    assert torch.equal(orthogonalize(g, 5, torch.float64), orthogonalize(g, 5, torch.float64, coeffs=(NS_COEFFS,)))


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (48, 32), (128, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_polar_express_singular_values_band(shape, dtype):
    """The record's coefficients map every singular value in [1e-3, 1] (after normalisation) into
    [0.8589, 1.1411] (the scalar polynomial's range): a narrower band than the classic quintic's
    [0.68, 1.13] at 5 steps. bf16 stays within a few thousandths of it."""
    for seed in range(3):
        g = randn(*shape, seed=seed, dtype=torch.float32)
        sv = torch.linalg.svdvals(PE(g, 5, dtype).float())
        slack = 0.0 if dtype == torch.float32 else 0.01
        assert 0.858 - slack < sv.min() and sv.max() < 1.1412 + slack, (sv.min(), sv.max())
        classic = torch.linalg.svdvals(orthogonalize(g, 5, torch.float32))
        assert classic.min() < 0.75 < sv.min()


def test_polar_express_batched_equals_per_matrix():
    stack = torch.stack([randn(32, 48, seed=30 + i, dtype=torch.float32) for i in range(5)])
    stack[1] *= 100.0  # each matrix normalised by its own norm
    batched = PE(stack, 5, torch.float32)
    for i in range(5):
        assert torch.allclose(batched[i], PE(stack[i], 5, torch.float32), atol=1e-5, rtol=0)


def test_polar_express_through_a_compiled_orthogonalize():
    """The trainer compiles orthogonalize; the coefficients reach it as a keyword (eager backend:
    the trace is the point, not the kernels)."""
    runs = []
    for compiled in (False, True):
        p = torch.nn.Parameter(randn(24, 8, seed=1, dtype=torch.float32))
        opt = Muon([p], lr=0.05, momentum=0.9, backend_steps=5, ns_dtype=torch.float32, ns="polar_express")
        if compiled:
            opt.orthogonalize = torch.compile(orthogonalize, backend="eager")
        p.grad = randn(24, 8, seed=2, dtype=torch.float32)
        opt.step()
        runs.append(p.detach())
    assert torch.equal(*runs)


# --- Muon with the variants: a float64 hand reference ----------------------------------------

def muon_reference(params, grads_per_step, lr, momentum, coeffs, row_norm, wd=0.0):
    """Momentum, Nesterov, (row norm), Newton-Schulz with `coeffs`, the sqrt(max(1, r/c)) scale,
    decoupled weight decay: one loop per matrix."""
    params = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            bufs[i] = momentum * bufs[i] + g
            d = g + momentum * bufs[i]
            if row_norm:  # the record's: each row's L2 norm taken in fp32, clamped at 1e-7
                d = d / d.float().norm(dim=1, keepdim=True).clamp(min=1e-7).double()
            u = ns_reference(d, coeffs) * max(1.0, d.shape[0] / d.shape[1]) ** 0.5
            params[i] = params[i] * (1 - lr * wd) - lr * u
    return params


def run_muon(shapes, steps, batched, **variant):
    params = [torch.nn.Parameter(randn(*s, seed=50 + i)) for i, s in enumerate(shapes)]
    opt = Muon(params, lr=0.04, momentum=0.9, backend_steps=5, ns_dtype=torch.float64, batched=batched,
               weight_decay=0.1, **variant)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


SHAPES_MUON = [(48, 16), (16, 48), (16, 48), (32, 32), (32, 32), (24, 8)]


@pytest.mark.parametrize("ns, row_norm", [("polar_express", False), ("classic", True), ("polar_express", True)])
@pytest.mark.parametrize("batched", [False, True])
def test_muon_variants_match_the_hand_reference(ns, row_norm, batched):
    steps = [[randn(*s, seed=100 * k + i) for i, s in enumerate(SHAPES_MUON)] for k in range(3)]
    for g in steps[0]:
        g[0] *= 1000.0  # a row far larger than the rest: normalised away by row_norm only
    coeffs = RECORD_PE if ns == "polar_express" else [NS_COEFFS] * 5
    start = [randn(*s, seed=50 + i) for i, s in enumerate(SHAPES_MUON)]
    expected = muon_reference(start, steps, 0.04, 0.9, coeffs, row_norm, wd=0.1)
    got = run_muon(SHAPES_MUON, steps, batched, ns=ns, row_norm=row_norm)
    for e, o in zip(expected, got):
        assert torch.allclose(o, e, rtol=1e-9, atol=1e-11)
    # Each switch changes the result.
    other = muon_reference(start, steps, 0.04, 0.9, coeffs, not row_norm, wd=0.1)
    assert not torch.allclose(got[0], other[0], atol=1e-4)


def test_row_norm_normalises_the_rows_of_the_parameter_before_newton_schulz():
    """The rows are the parameter's (output) rows, also for a tall matrix that Newton-Schulz runs
    transposed; the gradient handed to NS has unit rows (seen through a recording orthogonalize)."""
    seen = []

    def recording(x, steps, dtype):
        seen.append(x.clone())
        return orthogonalize(x, steps, dtype)

    for shape in ((24, 8), (8, 24)):
        p = torch.nn.Parameter(torch.zeros(*shape, dtype=torch.float64))
        opt = Muon([p], lr=0.1, momentum=0.9, backend_steps=5, ns_dtype=torch.float64, row_norm=True)
        opt.orthogonalize = recording
        p.grad = randn(*shape, seed=7) * torch.arange(1, shape[0] + 1, dtype=torch.float64)[:, None]
        opt.step()
        assert seen[-1].shape == shape
        assert torch.allclose(seen[-1].norm(dim=1), torch.ones(shape[0], dtype=torch.float64))
    # A zero row stays zero (the norm is clamped at 1e-7, no NaN).
    p = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.float64))
    opt = Muon([p], lr=0.1, momentum=0.9, backend_steps=5, ns_dtype=torch.float64, row_norm=True)
    p.grad = randn(4, 8, seed=8)
    p.grad[2] = 0.0
    opt.step()
    assert torch.isfinite(p).all()


# --- config -----------------------------------------------------------------------------------

def test_switches_reach_muon_and_default_is_classic():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2))
    cpu = torch.device("cpu")
    default = build_optimizers(model, OptimConfig(), cpu).muon
    assert default.ns_coeffs == (NS_COEFFS,) and not default.row_norm
    muon = build_optimizers(model, OptimConfig(muon_ns="polar_express", muon_row_norm=True), cpu).muon
    assert muon.ns_coeffs == tuple(RECORD_PE) and muon.row_norm
    cfg, _ = resolve_config(None, ["optim.muon_ns=polar_express", "optim.muon_row_norm=true"], env={})
    assert (cfg.optim.muon_ns, cfg.optim.muon_row_norm) == ("polar_express", True)
    with pytest.raises(ConfigError, match="optim.muon_ns must be classic or polar_express, got 'polar'"):
        resolve_config(None, ["optim.muon_ns=polar"], env={})
