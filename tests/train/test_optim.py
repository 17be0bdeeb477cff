"""Muon (Newton-Schulz orthogonalisation) and the optimizer grouping, against hand references."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.config import ModelConfig, OptimConfig
from pgolf.model.gpt import GPT
from pgolf.model.roles import UntaggedParameterError
from pgolf.train.muon import Muon, orthogonalize
from pgolf.train.optim import build_optimizers, check_one_group_each, muon_momentum_at

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


def test_group_order_is_the_order_checkpoints_were_saved_in():
    """Optimizer state is matched by position: within each group the blocks' parameters come
    first, in module order, then the model's own (skip_weights), as before roles."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    opts = build_optimizers(model, OptimConfig(), CPU)
    names = {id(p): n for n, p in model.named_parameters()}
    block = list(model.blocks.named_parameters(prefix="blocks"))
    assert [names[i] for i in groups_by_id(opts.muon)] == [n for n, p in block if p.ndim == 2 and "resid_mix" not in n]
    assert [names[i] for i in groups_by_id(opts.adam_scalar)] == \
        [n for n, p in block if p.ndim < 2 or "resid_mix" in n] + ["skip_weights"]


def test_an_untagged_parameter_is_named_before_any_optimizer_is_built():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    model.blocks[2].attn.bias = torch.nn.Parameter(torch.zeros(32))  # a module forgetting tag()
    with pytest.raises(UntaggedParameterError, match=r"blocks\.2\.attn\.bias"):
        build_optimizers(model, OptimConfig(), CPU)


def test_every_parameter_in_exactly_one_group_is_checked_by_name():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    opts = build_optimizers(model, OptimConfig(), CPU)
    check_one_group_each(model, opts)
    c_q = model.blocks[1].attn.c_q.weight
    opts.adam_scalar.add_param_group({"params": [c_q], "lr": 0.1, "base_lr": 0.1})
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.c_q\.weight is in 2 groups \(muon\[0\], adam_scalar\[1\]\)"):
        check_one_group_each(model, opts)
    opts.adam_scalar.param_groups.pop()
    muon_params = opts.muon.param_groups[0]["params"]
    muon_params[:] = [p for p in muon_params if p is not c_q]
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.c_q\.weight is in no optimizer group"):
        check_one_group_each(model, opts)


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


# ----------------------------------------------------------------------------------------
# Decoupled weight decay (optim.muon_wd, optim.adam_wd)
# ----------------------------------------------------------------------------------------

def test_muon_weight_decay_exact_on_a_tiny_tensor():
    # A zero gradient orthogonalises to a zero update, so only the decay acts: p * (1 - lr wd).
    p = torch.nn.Parameter(torch.tensor([[1.0, 2.0, -4.0], [3.0, 4.0, 0.5]]))
    p.grad = torch.zeros_like(p)
    opt = Muon([p], lr=0.5, momentum=0.95, backend_steps=5, ns_dtype=torch.float32, weight_decay=0.5)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([[0.75, 1.5, -3.0], [2.25, 3.0, 0.375]]))
    opt.param_groups[0]["lr"] = 0.25  # the scheduled lr, not the base one, scales the decay
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([[0.75, 1.5, -3.0], [2.25, 3.0, 0.375]]) * 0.875)


def decayed_replay(p0, deltas, decay):
    """Weights after steps whose updates do not depend on the weights: p <- d p + delta_k."""
    p = p0.clone()
    for delta in deltas:
        p = decay * p + delta
    return p


def run_steps(opt, p, grads):
    """Step opt on p for each gradient; returns p's change at every step."""
    deltas = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        deltas.append(p.detach() - before)
    return deltas


def test_muon_weight_decay_is_decoupled_from_the_update():
    # Muon's updates depend only on the gradients, so with decay d = 1 - lr wd the decayed run is
    # the plain run's updates replayed as p <- d p + delta_k.
    p0 = randn(16, 8, seed=5)
    grads = [randn(16, 8, seed=6 + k) for k in range(3)]
    plain = torch.nn.Parameter(p0.clone())
    deltas = run_steps(Muon([plain], lr=0.04, momentum=0.9, backend_steps=5, ns_dtype=torch.float32), plain, grads)
    decayed = torch.nn.Parameter(p0.clone())
    run_steps(Muon([decayed], lr=0.04, momentum=0.9, backend_steps=5, ns_dtype=torch.float32, weight_decay=0.1),
              decayed, grads)
    assert torch.allclose(decayed.detach(), decayed_replay(p0, deltas, 1 - 0.04 * 0.1), atol=1e-6, rtol=0)
    assert not torch.allclose(decayed.detach(), plain.detach(), atol=1e-3)


def test_muon_without_gradient_is_not_decayed():
    a = torch.nn.Parameter(randn(8, 4, seed=1))
    b = torch.nn.Parameter(randn(4, 8, seed=2))
    before = b.detach().clone()
    a.grad = randn(8, 4, seed=3)
    Muon([a, b], lr=0.1, momentum=0.95, backend_steps=5, ns_dtype=torch.float32, weight_decay=0.5).step()
    assert torch.equal(b, before)


def test_default_config_keeps_plain_adam_and_no_decay():
    torch.manual_seed(0)
    opts = build_optimizers(GPT(ModelConfig(**TINY, tie_embeddings=False)), OptimConfig(), CPU)
    for opt in (opts.adam_token, opts.adam_scalar, opts.adam_head):
        assert type(opt) is torch.optim.Adam and opt.param_groups[0]["weight_decay"] == 0
    assert opts.muon.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_of_every_group_uses_its_scheduled_lr_exactly(tie):
    # Zero gradients: Adam's and Muon's updates are exactly zero, so every parameter must be
    # exactly p * (1 - lr * wd) with its own group's scheduled lr.
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, tie_embeddings=tie))
    cfg = OptimConfig(muon_wd=0.5, adam_wd=0.25)
    opts = build_optimizers(model, cfg, CPU)
    for opt in (opts.adam_token, opts.adam_scalar) + ((opts.adam_head,) if not tie else ()):
        assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.25
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opts.set_lr_scale(0.5)
    opts.step()
    for opt in opts.all():
        group = opt.param_groups[0]
        wd = 0.5 if opt is opts.muon else 0.25
        assert group["lr"] == 0.5 * group["base_lr"]
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            assert torch.equal(p.detach(), before[name] * (1 - group["lr"] * wd)), name


def test_embedding_tables_take_their_own_weight_decay_and_follow_adam_wd_by_default():
    model = GPT(ModelConfig(**TINY))
    follows = build_optimizers(model, OptimConfig(adam_wd=0.04), CPU)
    assert follows.adam_token.param_groups[0]["weight_decay"] == 0.04
    own = build_optimizers(model, OptimConfig(adam_wd=0.04, embed_wd=0.0), CPU)
    assert own.adam_token.param_groups[0]["weight_decay"] == 0.0
    assert own.adam_scalar.param_groups[0]["weight_decay"] == 0.04
    only_tables = build_optimizers(model, OptimConfig(embed_wd=0.1), CPU)
    assert isinstance(only_tables.adam_token, torch.optim.AdamW)
    assert only_tables.adam_token.param_groups[0]["weight_decay"] == 0.1
    assert only_tables.adam_scalar.param_groups[0]["weight_decay"] == 0.0


def test_adam_weight_decay_is_decoupled():
    # AdamW's direction depends only on the gradients: the same replay with d = 1 - lr wd = 0.95.
    p0 = randn(6, 4, seed=8)
    grads = [randn(6, 4, seed=9 + k) for k in range(3)]
    plain = torch.nn.Parameter(p0.clone())
    deltas = run_steps(torch.optim.Adam([plain], lr=0.1, betas=(0.9, 0.95), eps=1e-8), plain, grads)
    decayed = torch.nn.Parameter(p0.clone())
    run_steps(torch.optim.AdamW([decayed], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5), decayed, grads)
    assert torch.allclose(decayed.detach(), decayed_replay(p0, deltas, 0.95), atol=1e-6, rtol=0)
    assert not torch.allclose(decayed.detach(), plain.detach(), atol=1e-2)


def test_weight_decay_config_is_validated():
    from pgolf.config import ConfigError
    from pgolf.config.resolve import resolve_config

    cfg, _ = resolve_config(None, ["optim.muon_wd=0.02", "optim.adam_wd=0.01"], env={})
    assert (cfg.optim.muon_wd, cfg.optim.adam_wd) == (0.02, 0.01)
    with pytest.raises(ConfigError, match="optim.muon_wd must be >= 0"):
        resolve_config(None, ["optim.muon_wd=-0.1"], env={})


# ----------------------------------------------------------------------------------------
# Batched Newton-Schulz (optim.batched_ns)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16)])
def test_batched_orthogonalize_is_the_quintic_iteration_per_matrix(shape):
    stack = torch.stack([randn(*shape, seed=20 + i, dtype=torch.float64) for i in range(4)])
    stack[2] *= 100.0  # each matrix is normalised by its own norm, not the stack's
    out = orthogonalize(stack, steps=5, dtype=torch.float64)
    assert out.shape == stack.shape
    for i in range(4):
        assert torch.allclose(out[i], quintic_newton_schulz(stack[i], 5), rtol=1e-10, atol=1e-12)
    # The iteration count is honoured: 3 steps is a different (less converged) result.
    assert not torch.allclose(orthogonalize(stack, steps=3, dtype=torch.float64)[0], out[0], atol=1e-3)


def test_batched_orthogonalize_matches_per_matrix_fp32():
    stack = torch.stack([randn(32, 48, seed=30 + i) for i in range(6)])
    batched = orthogonalize(stack, steps=5, dtype=torch.float32)
    for i in range(6):
        assert torch.allclose(batched[i], orthogonalize(stack[i], 5, torch.float32), atol=1e-5, rtol=0)


def test_orthogonalize_many_groups_by_shape_and_keeps_order():
    from pgolf.train.muon import orthogonalize_many

    shapes = [(16, 32), (32, 16), (16, 32), (8, 8), (24, 8), (16, 32)]  # (32,16) joins the (16,32) bank
    mats = [randn(*s, seed=40 + i) for i, s in enumerate(shapes)]
    calls = []

    def counting(x, steps, dtype):
        calls.append(tuple(x.shape))
        return orthogonalize(x, steps, dtype)

    out = orthogonalize_many(mats, 5, torch.float32, counting)
    assert sorted(calls) == sorted([(4, 16, 32), (8, 8), (24, 8)])
    for m, o in zip(mats, out):
        assert o.shape == m.shape
        assert torch.allclose(o, orthogonalize(m, 5, torch.float32), atol=1e-5, rtol=0)
    assert torch.equal(out[3], orthogonalize(mats[3], 5, torch.float32))  # a lone matrix: unbatched path


def test_muon_batched_matches_per_matrix_muon():
    shapes = [(48, 16), (16, 48), (16, 48), (32, 32), (32, 32)]
    finals = []
    for batched in (False, True):
        params = [torch.nn.Parameter(randn(*s, seed=50 + i)) for i, s in enumerate(shapes)]
        opt = Muon(params, lr=0.04, momentum=0.9, backend_steps=5, ns_dtype=torch.float32, batched=batched)
        for k in range(3):
            for i, p in enumerate(params):
                p.grad = randn(*p.shape, seed=100 * k + i)
            opt.step()
        finals.append([p.detach() for p in params])
    for a, b in zip(*finals):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_batched_ns_switch():
    from pgolf.config import ConfigError
    from pgolf.config.resolve import resolve_config

    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    assert not build_optimizers(model, OptimConfig(), CPU).muon.batched  # auto: on for CUDA only
    assert build_optimizers(model, OptimConfig(batched_ns="on"), CPU).muon.batched
    with pytest.raises(ConfigError, match="optim.batched_ns must be auto, on or off"):
        resolve_config(None, ["optim.batched_ns=yes"], env={})


def test_parameters_without_elements_join_no_group():
    """A layout without skips has an empty skip_weights: nothing to train, and no optimizer
    state slot (checkpoints written before roles must keep resuming)."""
    model = GPT(ModelConfig(vocab_size=64, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2))
    assert model.skip_weights.numel() == 0
    opts = build_optimizers(model, OptimConfig(), torch.device("cpu"))
    assert all(p is not model.skip_weights for opt in opts.all() for g in opt.param_groups for p in g["params"])
