"""Muon (Newton-Schulz orthogonalisation) and the optimizer grouping, against hand references."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.config import ModelConfig, OptimConfig
from pgolf.model import GPT
from pgolf.optim import Muon, build_optimizers, muon_momentum_at, orthogonalize

CPU = torch.device("cpu")
TINY = dict(vocab_size=64, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2)
BLOCK_MATRICES = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
                  "mlp.fc.weight", "mlp.proj.weight")
BLOCK_CONTROLS = ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain")


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------
# Newton-Schulz
# ----------------------------------------------------------------------------------------

def quintic_newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Hand-written quintic iteration X <- aX + b(XX^T)X + c(XX^T)^2 X on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (torch.linalg.matrix_norm(g) + 1e-7)
    transpose = g.shape[0] > g.shape[1]
    if transpose:
        x = x.mT
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + b * (s @ x) + c * (s @ (s @ x))
    return x.mT if transpose else x


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (48, 32), (32, 48), (128, 64)])
def test_orthogonalize_singular_values_in_quintic_band(shape):
    for seed in range(4):
        g = randn(*shape, seed=seed)
        out = orthogonalize(g, steps=5, dtype=torch.float32)
        assert out.shape == g.shape and out.dtype == torch.float32
        sv = torch.linalg.svdvals(out)
        assert sv.min() > 0.65 and sv.max() < 1.21, (shape, seed, sv.min(), sv.max())
        # Same singular vectors as the polar factor U V^T of g (only the spectrum is squashed).
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        polar = u @ vh
        cosine = (out * polar).sum() / (out.norm() * polar.norm())
        assert cosine > 0.95


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16)])
def test_orthogonalize_is_the_quintic_iteration(shape):
    g = randn(*shape, seed=7, dtype=torch.float64)
    out = orthogonalize(g, steps=5, dtype=torch.float64)
    assert torch.allclose(out, quintic_newton_schulz(g, 5), rtol=1e-10, atol=1e-12)


def test_orthogonalize_default_dtype_is_bf16_like_official():
    g = randn(32, 16, seed=1)
    out = orthogonalize(g, steps=5)
    assert out.dtype == torch.bfloat16 and out.shape == (32, 16)
    sv = torch.linalg.svdvals(out.float())
    assert sv.min() > 0.6 and sv.max() < 1.3


def test_orthogonalize_does_not_modify_input():
    g = randn(16, 8, seed=2)
    before = g.clone()
    orthogonalize(g, steps=5, dtype=torch.float32)
    assert torch.equal(g, before)


# ----------------------------------------------------------------------------------------
# Muon step
# ----------------------------------------------------------------------------------------

def muon_reference(params, grads_per_step, lr, momentum, steps, nesterov=True):
    """Muon by hand: buf = m*buf + g; u = g + m*buf (Nesterov) or buf; orthogonalise;
    scale by sqrt(max(1, rows/cols)); p -= lr * u."""
    params = [p.detach().clone().double() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, buf, g in zip(params, bufs, grads):
            g = g.double()
            buf.mul_(momentum).add_(g)
            u = g + momentum * buf if nesterov else buf.clone()
            u = quintic_newton_schulz(u, steps)
            u = u * math.sqrt(max(1.0, u.shape[0] / u.shape[1]))
            p.sub_(lr * u)
    return params


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_steps_match_hand_reference(nesterov):
    shapes = [(48, 16), (16, 40)]  # tall (scaled by sqrt(3)) and wide (scale 1)
    params = [torch.nn.Parameter(randn(*s, seed=i)) for i, s in enumerate(shapes)]
    grads = [[randn(*s, seed=10 * k + i) for i, s in enumerate(shapes)] for k in range(3)]
    expected = muon_reference(params, grads, lr=0.04, momentum=0.9, steps=5, nesterov=nesterov)
    opt = Muon(params, lr=0.04, momentum=0.9, backend_steps=5, nesterov=nesterov, ns_dtype=torch.float32)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for p, e in zip(params, expected):
        assert p.dtype == torch.float32
        assert torch.allclose(p.double(), e, atol=2e-6, rtol=0)
    # The momentum buffer after three steps: g3 + m*g2 + m^2*g1.
    buf = opt.state[params[0]]["momentum_buffer"]
    assert torch.allclose(buf, grads[2][0] + 0.9 * grads[1][0] + 0.81 * grads[0][0], atol=1e-6)


def test_muon_single_step_by_hand_tall_and_wide():
    # One step from a zero buffer: buf = g, u = g + m*g = (1+m) g; the normalisation inside
    # Newton-Schulz makes the (1+m) factor irrelevant, so update = NS(g) * sqrt(max(1, r/c)).
    for shape, scale in (((64, 16), 2.0), ((16, 64), 1.0)):
        p = torch.nn.Parameter(randn(*shape, seed=3))
        start = p.detach().clone()
        g = randn(*shape, seed=4)
        p.grad = g.clone()
        Muon([p], lr=0.5, momentum=0.95, backend_steps=5, ns_dtype=torch.float32).step()
        update = quintic_newton_schulz(g.double(), 5) * scale
        assert torch.allclose(p.detach().double(), start.double() - 0.5 * update, atol=2e-6)


def test_muon_skips_parameters_without_grad():
    a = torch.nn.Parameter(randn(8, 4, seed=1))
    b = torch.nn.Parameter(randn(4, 8, seed=2))
    before = b.detach().clone()
    a.grad = randn(8, 4, seed=3)
    opt = Muon([a, b], lr=0.1, momentum=0.95, backend_steps=5, ns_dtype=torch.float32)
    opt.step()
    assert torch.equal(b, before)
    assert a in opt.state and b not in opt.state


# ----------------------------------------------------------------------------------------
# Momentum warmup
# ----------------------------------------------------------------------------------------

def test_muon_momentum_warmup():
    cfg = OptimConfig()
    assert muon_momentum_at(0, cfg) == pytest.approx(0.85)
    assert muon_momentum_at(100, cfg) == pytest.approx(0.87)
    assert muon_momentum_at(250, cfg) == pytest.approx(0.90)
    assert muon_momentum_at(500, cfg) == pytest.approx(0.95)
    assert muon_momentum_at(10_000, cfg) == pytest.approx(0.95)
    no_warmup = OptimConfig(muon_momentum_warmup_steps=0, muon_momentum=0.9)
    assert muon_momentum_at(0, no_warmup) == 0.9


# ----------------------------------------------------------------------------------------
# Grouping
# ----------------------------------------------------------------------------------------

def groups_by_id(opt):
    return [id(p) for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("tie", [True, False])
def test_build_optimizers_groups(tie):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, tie_embeddings=tie))
    cfg = OptimConfig()
    opts = build_optimizers(model, cfg, CPU)

    expected_muon = {id(model.get_parameter(f"blocks.{i}.{n}")) for i in range(5) for n in BLOCK_MATRICES}
    expected_scalar = {id(model.get_parameter(f"blocks.{i}.{n}")) for i in range(5) for n in BLOCK_CONTROLS}
    expected_scalar.add(id(model.skip_weights))
    assert len(expected_muon) == 30 and len(expected_scalar) == 21

    muon_ids = groups_by_id(opts.muon)
    scalar_ids = groups_by_id(opts.adam_scalar)
    assert set(muon_ids) == expected_muon and len(muon_ids) == 30
    assert set(scalar_ids) == expected_scalar and len(scalar_ids) == 21
    assert groups_by_id(opts.adam_token) == [id(model.tok_emb.weight)]
    assert all(p.ndim == 2 for g in opts.muon.param_groups for p in g["params"])

    token_group = opts.adam_token.param_groups[0]
    assert token_group["lr"] == token_group["base_lr"] == (0.05 if tie else 0.6)
    if tie:
        assert opts.adam_head is None
        assert len(opts.all()) == 3
    else:
        assert groups_by_id(opts.adam_head) == [id(model.lm_head.weight)]
        head_group = opts.adam_head.param_groups[0]
        assert head_group["lr"] == head_group["base_lr"] == 0.008
        assert len(opts.all()) == 4

    # Every parameter is optimised by exactly one optimizer.
    all_ids = [pid for opt in opts.all() for pid in groups_by_id(opt)]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    assert len(all_ids) == len(set(all_ids))

    muon_group = opts.muon.param_groups[0]
    assert muon_group["lr"] == muon_group["base_lr"] == 0.04
    assert muon_group["momentum"] == 0.95 and muon_group["backend_steps"] == 5 and muon_group["nesterov"]
    assert opts.muon.ns_dtype == torch.float32  # fp32 Newton-Schulz on CPU
    scalar_group = opts.adam_scalar.param_groups[0]
    assert scalar_group["lr"] == scalar_group["base_lr"] == 0.04
    for opt in (opts.adam_token, opts.adam_scalar):
        group = opt.param_groups[0]
        assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8
        assert group["weight_decay"] == 0 and not group["fused"]


def test_resid_mix_and_skip_weights_are_not_muon_matrices():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    opts = build_optimizers(model, OptimConfig(), CPU)
    muon = set(groups_by_id(opts.muon))
    assert id(model.skip_weights) not in muon
    assert all(id(b.resid_mix) not in muon for b in model.blocks)


def test_learning_rates_follow_config():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, tie_embeddings=False))
    cfg = OptimConfig(embed_lr=0.3, head_lr=0.01, matrix_lr=0.02, scalar_lr=0.03, beta1=0.8,
                      muon_backend_steps=3)
    opts = build_optimizers(model, cfg, CPU)
    assert opts.adam_token.param_groups[0]["base_lr"] == 0.3
    assert opts.adam_head.param_groups[0]["base_lr"] == 0.01
    assert opts.muon.param_groups[0]["base_lr"] == 0.02
    assert opts.muon.param_groups[0]["backend_steps"] == 3
    assert opts.adam_scalar.param_groups[0]["base_lr"] == 0.03
    assert opts.adam_scalar.param_groups[0]["betas"] == (0.8, 0.95)


def test_set_lr_scale_and_momentum():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, tie_embeddings=False))
    opts = build_optimizers(model, OptimConfig(), CPU)
    opts.set_lr_scale(0.25)
    expected = {id(opts.adam_token): 0.6, id(opts.muon): 0.04, id(opts.adam_scalar): 0.04, id(opts.adam_head): 0.008}
    for opt in opts.all():
        for group in opt.param_groups:
            assert group["base_lr"] == expected[id(opt)]
            assert group["lr"] == pytest.approx(0.25 * expected[id(opt)], rel=1e-15)
    opts.set_lr_scale(1.0)
    assert all(g["lr"] == g["base_lr"] for opt in opts.all() for g in opt.param_groups)
    opts.set_muon_momentum(0.875)
    assert opts.muon.param_groups[0]["momentum"] == 0.875


def test_optimizers_step_updates_every_parameter_and_state_round_trips():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, tie_embeddings=False))
    opts = build_optimizers(model, OptimConfig(), CPU)
    x = torch.randint(0, 64, (2, 16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Three steps: at init only the zero-initialised head gets a gradient, after one step
    # the output projections and embeddings too, after two every path is live.
    for _ in range(3):
        model(x, x.roll(-1, 1)).backward()
        opts.step()
        opts.zero_grad()
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name
        assert p.grad is None
    states = opts.state_dict()
    fresh = build_optimizers(model, OptimConfig(), CPU)
    fresh.load_state_dict(states)
    assert [len(o.state) for o in fresh.all()] == [len(o.state) for o in opts.all()]
