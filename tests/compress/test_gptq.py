"""GPTQ: beats naive rounding on correlated inputs; Hessian collection on the real model."""
import numpy as np
import pytest
import torch
from torch import nn

from pgolf.config import ModelConfig
from pgolf.data.shards import write_shard
from pgolf.compress.gptq import (MIN_SCALE, calibration_batches, collect_hessians, dequantize_rows,
                        gptq_quantize, gptq_state_dict, hessian_error, qmax_for, quantize_rows,
                        row_scales)
from pgolf.model.gpt import GPT, CastedLinear

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ROWS, COLS = 48, 96


def correlated_inputs(n: int, seed: int, cols: int = COLS) -> torch.Tensor:
    """X = Z A: a random mixing of few latent factors plus a little noise -> strongly correlated."""
    mix = torch.Generator().manual_seed(1234)  # the same mixing for train and held-out draws
    A = torch.randn(16, cols, generator=mix)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g) @ A + 0.05 * torch.randn(n, cols, generator=g)


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(ROWS, COLS, generator=g) * 0.05
    X = correlated_inputs(2048, seed=1)
    H = X.T @ X / X.shape[0]
    X_test = correlated_inputs(1024, seed=2)
    return W, H, X_test


def output_error(X, W, W_hat):
    return float((X @ W.T - X @ W_hat.T).square().sum())


@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_naive_rounding(layer, bits, act_order):
    W, H, X_test = layer
    q, scale, stats = gptq_quantize(W, H, bits, block_size=32, act_order=act_order)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert q.shape == W.shape and scale.shape == (ROWS,)
    assert int(q.abs().max()) <= qmax_for(bits)
    W_gptq = dequantize_rows(q, scale)
    for clip_search in (False, True):  # naive with absmax scales, and with searched clips
        nq, ns = quantize_rows(W, bits, clip_search=clip_search)
        W_naive = dequantize_rows(nq, ns)
        assert hessian_error(W, W_gptq, H) < 0.5 * hessian_error(W, W_naive, H)
        assert output_error(X_test, W, W_gptq) < 0.5 * output_error(X_test, W, W_naive)
    assert stats.error_gptq == pytest.approx(hessian_error(W, W_gptq, H))
    assert stats.ratio < 0.5 and stats.bits == bits and stats.act_order == act_order


def test_block_size_does_not_change_the_result(layer):
    # Lazy batch updates are an exact reordering of the same arithmetic.
    W, H, _ = layer
    q1, s1, st1 = gptq_quantize(W, H, 4, block_size=COLS)
    q2, s2, st2 = gptq_quantize(W, H, 4, block_size=7)
    assert torch.equal(s1, s2)
    assert (q1 == q2).float().mean() > 0.99
    assert st2.error_gptq == pytest.approx(st1.error_gptq, rel=1e-2)


def test_identity_hessian_equals_naive_rounding(layer):
    # Uncorrelated inputs: nothing to compensate, GPTQ is round-to-nearest.
    W, _, _ = layer
    q, s, stats = gptq_quantize(W, torch.eye(COLS), 5, block_size=16)
    nq, ns = quantize_rows(W, 5, clip_search=True)
    assert torch.equal(q, nq) and torch.equal(s, ns)
    assert stats.ratio == pytest.approx(1.0)


def test_given_scales_are_used(layer):
    W, H, _ = layer
    s = row_scales(W, 4, clip_search=False) * 0.9
    q, scale, stats = gptq_quantize(W, H, 4, scale=s)
    assert torch.equal(scale, s.half())
    assert stats.ratio < 0.5
    with pytest.raises(ValueError, match="scale has shape"):
        gptq_quantize(W, H, 4, scale=s[:3])


def test_deterministic(layer):
    W, H, _ = layer
    a = gptq_quantize(W, H, 4, act_order=True)
    b = gptq_quantize(W, H, 4, act_order=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_dead_columns(layer):
    W, _, _ = layer
    X = correlated_inputs(2048, seed=3)
    dead = torch.tensor([0, 5, 40, 95])
    X[:, dead] = 0
    H = X.T @ X / X.shape[0]
    for act_order in (False, True):
        q, s, stats = gptq_quantize(W, H, 4, act_order=act_order)
        assert stats.dead_columns == 4
        assert torch.isfinite(s.float()).all()
        assert (q[:, dead] == 0).all()
        assert stats.error_gptq < 0.5 * stats.error_naive


def test_not_positive_definite_hessian_gets_more_damping(layer):
    W, _, _ = layer
    X = correlated_inputs(8, seed=4)  # rank <= 8 << COLS
    H = X.T @ X / 8
    H -= 0.01 * H.diagonal().mean() * torch.eye(COLS)  # slightly indefinite
    q, s, stats = gptq_quantize(W, H, 6, damp=0.0)
    assert stats.damp > 0.01
    assert torch.isfinite(dequantize_rows(q, s)).all()


def test_scales_and_zero_rows():
    W = torch.randn(4, 16)
    W[2] = 0
    s = row_scales(W, 6, clip_search=False)
    assert s[2] == pytest.approx(MIN_SCALE)
    assert torch.equal(s, s.half().float())  # exactly representable in fp16
    q, scale = quantize_rows(W, 6, clip_search=False)
    assert torch.allclose(dequantize_rows(q, scale), W, atol=float(s.max()) / 2 + 1e-6)
    with pytest.raises(ValueError, match="bits"):
        qmax_for(9)


def test_collect_hessians_matches_x_transpose_x():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = CastedLinear(8, 4)

        def forward(self, x, y, reduction="mean"):
            return self.lin(x).sum()

    model = Tiny()
    xs = [torch.randn(3, 5, 8) for _ in range(2)]
    H = collect_hessians(model, [(x, None) for x in xs])
    X = torch.cat([x.reshape(-1, 8) for x in xs])
    assert set(H) == {"lin.weight"}
    assert torch.allclose(H["lin.weight"], X.T @ X / X.shape[0], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2)
    model = GPT(cfg)
    with torch.no_grad():  # give the zero-initialised projections some weight to quantize
        for m in model.modules():
            if isinstance(m, CastedLinear) and m.zero_init:
                m.weight.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
               for _ in range(2)]
    return model, batches


def test_collect_hessians_on_gpt(tiny_gpt):
    model, batches = tiny_gpt
    model.train()
    H = collect_hessians(model, batches)
    sd = model.state_dict()
    linear_names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, CastedLinear)}
    assert set(H) == linear_names and len(H) == 2 * 6
    for name, h in H.items():
        cols = sd[name].shape[1]
        assert h.shape == (cols, cols)
        assert torch.allclose(h, h.T, atol=1e-5)
        eig = torch.linalg.eigvalsh(h.double())
        assert eig.min() >= -1e-6 * eig.max()
        assert h.diagonal().sum() > 0
    assert model.training  # restored
    assert all(not m._forward_hooks for m in model.modules())
    only = collect_hessians(model, batches, names=["blocks.1.mlp.fc.weight"])
    assert set(only) == {"blocks.1.mlp.fc.weight"}
    assert torch.allclose(only["blocks.1.mlp.fc.weight"], H["blocks.1.mlp.fc.weight"], atol=1e-5)
    with pytest.raises(KeyError):
        collect_hessians(model, batches, names=["nope.weight"])


def test_hooks_removed_on_error(tiny_gpt):
    model, _ = tiny_gpt
    bad = [(torch.full((1, 4), 999), torch.zeros(1, 4, dtype=torch.long))]  # index out of range
    with pytest.raises(Exception):
        collect_hessians(model, bad)
    assert all(not m._forward_hooks for m in model.modules())


def test_gptq_state_dict(tiny_gpt):
    model, batches = tiny_gpt
    H = collect_hessians(model, batches)
    sd = model.state_dict()

    def bits_for(name):
        return 5 if ".attn." in name else (None if name.endswith("mlp.proj.weight") else 6)

    res = gptq_state_dict(model, H, bits_for, block_size=16)
    expected = {n for n in H if bits_for(n) is not None}
    assert set(res.tensors) == expected and set(res.stats) == expected
    assert res.seconds >= 0
    for name, (q, scale, bits) in res.tensors.items():
        assert bits == bits_for(name)
        assert q.dtype == torch.int8 and q.shape == sd[name].shape and scale.shape == (q.shape[0],)
        assert int(q.abs().max()) <= qmax_for(bits)
        assert res.stats[name].error_gptq <= res.stats[name].error_naive * 1.05
    deq = res.dequantized()
    assert set(deq) == expected
    assert any("GPTQ" in line for line in res.lines())


def test_calibration_batches_use_training_shards_only(tmp_path):
    tokens = np.arange(1000) % 64
    train = write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    val = write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    batches = calibration_batches(str(tmp_path / "fineweb_train_*.bin"), seq_len=16, n_seqs=5,
                                  batch_seqs=2, skip_tokens=3)
    assert [x.shape for x, _ in batches] == [(2, 16), (2, 16), (1, 16)]
    x = torch.cat([b[0] for b in batches]).flatten()
    y = torch.cat([b[1] for b in batches]).flatten()
    assert torch.equal(x, torch.arange(3, 83) % 64)
    assert torch.equal(y, torch.arange(4, 84) % 64)
    for files in ([val], [train, val], str(tmp_path / "fineweb_*.bin")):
        with pytest.raises(ValueError, match="training shards only"):
            calibration_batches(files, seq_len=16, n_seqs=2)
