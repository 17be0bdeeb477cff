"""Chunked softcapped cross-entropy (pgolf.train.losses) against the model's own loss path."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pgolf.config import ConfigError, ModelConfig
from pgolf.config.resolve import resolve_config
from pgolf.train.losses import model_loss, reference_softcapped_cross_entropy, softcapped_cross_entropy
from pgolf.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

N, D, V, CAP = 96, 16, 40, 30.0


def inputs(dtype=torch.float32, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    # Large enough activations that the softcap's tanh is far from linear.
    hidden = (scale * torch.randn(N, D, generator=gen)).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, **kwargs):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets, CAP, **kwargs)
    (loss if loss.ndim == 0 else (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum()).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 7, 32, N, 1000])
def test_fp32_forward_and_backward_match_reference(reduction, chunk):
    hidden, weight, targets = inputs()
    ref = loss_and_grads(reference_softcapped_cross_entropy, hidden, weight, targets, reduction=reduction)
    fused = loss_and_grads(softcapped_cross_entropy, hidden, weight, targets, reduction=reduction,
                           chunk_tokens=chunk)
    assert fused[0].dtype == torch.float32 and fused[0].shape == ref[0].shape
    for a, b in zip(fused, ref):  # fp32 round-off of differently ordered sums only
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item()), (a - b).abs().max()


def test_batched_shape_and_per_token_losses():
    hidden, weight, targets = inputs()
    h3, t3 = hidden.detach().view(4, N // 4, D), targets.view(4, N // 4)
    per_token = softcapped_cross_entropy(h3, weight, t3, CAP, reduction="none", chunk_tokens=10)
    assert per_token.shape == (4, N // 4)
    ref = reference_softcapped_cross_entropy(h3, weight, t3, CAP, reduction="none")
    assert torch.allclose(per_token, ref, rtol=1e-5, atol=1e-6)


def cosine(a, b):
    return float((a.float() * b.float()).sum() / (a.float().norm() * b.float().norm()))


def test_bf16_matches_reference_loosely():
    hidden, weight, targets = inputs(torch.bfloat16)
    ref = loss_and_grads(reference_softcapped_cross_entropy, hidden, weight, targets)
    fused = loss_and_grads(softcapped_cross_entropy, hidden, weight, targets, chunk_tokens=24)
    assert fused[1].dtype == fused[2].dtype == torch.bfloat16
    assert fused[0].item() == pytest.approx(ref[0].item(), rel=1e-3)
    for a, b in zip(fused[1:], ref[1:]):
        assert cosine(a, b) > 0.999
        assert torch.allclose(a.float(), b.float(), rtol=0.05, atol=0.02 * b.float().abs().max().item())


def test_autocast_computes_in_the_autocast_dtype_like_the_reference():
    # fp32 inputs under bf16 autocast: the reference's F.linear runs in bf16; so must ours.
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss_and_grads(reference_softcapped_cross_entropy, hidden, weight, targets)
        fused = loss_and_grads(softcapped_cross_entropy, hidden, weight, targets, chunk_tokens=24)
    plain = loss_and_grads(softcapped_cross_entropy, hidden, weight, targets, chunk_tokens=24)
    assert fused[1].dtype == torch.float32  # gradients flow back to the fp32 leaves
    assert fused[0].item() == pytest.approx(ref[0].item(), rel=2e-3)
    assert fused[0].item() != plain[0].item()  # bf16 really was used
    for a, b in zip(fused[1:], ref[1:]):
        assert cosine(a, b) > 0.999


class LargestTensor(TorchDispatchMode):
    """Records the largest logits-shaped tensor (last dim = vocab) any operator produces, and how
    many matmuls ran."""

    def __init__(self):
        super().__init__()
        self.largest, self.matmuls = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == V:
                self.largest = max(self.largest, t.numel())
        if func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "matmul"):
            self.matmuls += 1
        return out


def test_chunked_path_never_materialises_the_batch_logits():
    hidden, weight, targets = inputs()
    with LargestTensor() as ref_mode:
        reference_softcapped_cross_entropy(hidden, weight, targets, CAP).backward()
    assert ref_mode.largest >= N * V  # the reference holds all logits: the check can fail
    hidden.grad = weight.grad = None
    with LargestTensor() as mode:
        softcapped_cross_entropy(hidden, weight, targets, CAP, chunk_tokens=16).backward()
    assert mode.largest == 16 * V  # one chunk's logits at a time
    # 6 chunks: one logits matmul each forward, and three each backward (recompute, dhidden, dweight).
    assert mode.matmuls == 6 + 3 * 6


def test_model_loss_equals_the_model_forward():
    for tie in (True, False):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2,
                                tie_embeddings=tie))
        if not tie:  # the head is zero-initialised; give it weights so its gradient is informative
            torch.nn.init.normal_(model.lm_head.weight, std=0.5)
        x = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
        y = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(2))
        ref = model(x, y)
        ref.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        fused = model_loss(model, x, y, chunk_tokens=16)
        fused.backward()
        assert fused.item() == pytest.approx(ref.item(), rel=1e-6)
        for name, p in model.named_parameters():
            if name in ref_grads:
                assert torch.allclose(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6), name
        assert torch.allclose(model_loss(model, x, y, "none", 7), model(x, y, reduction="none").view(3, 20),
                              rtol=1e-5, atol=1e-6)


def test_compiles_without_graph_breaks():
    hidden, weight, targets = inputs()
    fn = torch.compile(lambda h, w, t: softcapped_cross_entropy(h, w, t, CAP, chunk_tokens=32), fullgraph=True,
                       backend="aot_eager")
    loss = fn(hidden, weight, targets)
    loss.backward()
    ref = loss_and_grads(reference_softcapped_cross_entropy, *inputs())
    assert torch.allclose(loss.detach(), ref[0], rtol=1e-5)
    assert torch.allclose(hidden.grad, ref[1], rtol=1e-5, atol=1e-6)


def test_bad_arguments_and_switch():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="reduction must be"):
        softcapped_cross_entropy(hidden, weight, targets, CAP, reduction="avg")
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        softcapped_cross_entropy(hidden, weight, targets, CAP, chunk_tokens=0)
    with pytest.raises(ConfigError, match="train.fused_loss must be auto, on or off"):
        resolve_config(None, ["train.fused_loss=fast"], env={})


def test_chunked_loss_model_wraps_without_copying():
    from pgolf.train.losses import ChunkedLossModel

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2))
    wrapped = ChunkedLossModel(model, chunk_tokens=8)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    assert wrapped(x, x).item() == pytest.approx(model(x, x).item(), rel=1e-6)
    assert torch.allclose(wrapped(x, x, reduction="sum"), model(x, x, reduction="sum"), rtol=1e-6)
    assert all(a is b for a, b in zip(wrapped.parameters(), model.parameters()))


def test_training_with_the_chunked_loss_matches_the_reference(tmp_path):
    from pgolf.train.run import run_training
    from tests.train.test_train import tiny_config

    common = ("train.iterations=3", "train.val_loss_every=0")
    off = run_training(tiny_config(tmp_path, *common, "run.run_id=off"), console=False)
    on = run_training(tiny_config(tmp_path, *common, "train.fused_loss=on", "run.run_id=on"), console=False)
    assert "fused_loss: True" in (tmp_path / "runs" / "on" / "train.log").read_text()
    assert "fused_loss: False" in (tmp_path / "runs" / "off" / "train.log").read_text()
    assert on["pre_quant"]["val_loss"] == pytest.approx(off["pre_quant"]["val_loss"], abs=1e-5)
