"""Quantization-aware training: fake quantization numerics and the late switch in training."""

import pytest
import torch

from pgolf.compress.quantizers.rows import dequantize_rows, quantize_rows
from pgolf.config import ModelConfig
from pgolf.model.gpt import GPT
from pgolf.train.qat import disable_qat, enable_qat, fake_quantize, qat_suspended
from pgolf.runs import read_metrics
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_ste_forward_is_quantized_and_gradient_passes_straight_through(bits):
    torch.manual_seed(0)
    w = torch.randn(8, 33, requires_grad=True)
    out = fake_quantize(w, bits, "ste")
    qmax = 2 ** (bits - 1) - 1
    # the export's per-row scale: max-abs clip, rounded to fp16 before the codes
    scale = (w.detach().abs().amax(dim=1, keepdim=True) / qmax).half().float()
    levels = out.detach() / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= qmax + 1e-4
    assert (out.detach() - w.detach()).abs().max() <= scale.max() / 2 + 1e-6
    (out * torch.arange(33.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(33.0).expand(8, 33))


def test_noise_mode_stays_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    out = fake_quantize(w, 6, "noise")
    scale = (w.abs().amax(dim=1, keepdim=True) / 31).half().float()
    assert not torch.equal(out, w) and ((out - w).abs() <= scale / 2 + 1e-7).all()


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_ste_forward_is_exactly_what_the_export_stores_without_clip_search(bits):
    torch.manual_seed(1)
    w = torch.randn(16, 70)
    q, s = quantize_rows(w, bits, clip_search=False)
    assert torch.equal(fake_quantize(w, bits, "ste"), dequantize_rows(q, s))


def test_hooks_apply_to_matching_layers_only_and_can_be_suspended():
    model = GPT(ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(0, 64, (2, 16))
    plain = model(x, x).item()
    n = enable_qat(model, 4, "ste", r"^blocks\.0\.attn")
    assert n == 4  # c_q, c_k, c_v, proj of block 0
    assert model.blocks[1].attn.c_q.weight_transform is None
    assert model(x, x).item() != plain
    with qat_suspended(model):
        assert model(x, x).item() == plain
    assert model(x, x).item() != plain
    disable_qat(model)
    assert model(x, x).item() == plain


def test_training_switches_qat_on_late(tmp_path):
    cfg = tiny_config(tmp_path, "train.iterations=8", "qat.enabled=true", "qat.start_frac=0.5", "qat.bits=5")
    summary = run_training(cfg, console=False)
    events = read_metrics(tmp_path / "runs" / summary["run_id"])
    (qat,) = [e for e in events if e["event"] == "qat"]
    assert qat["step"] == 4 and qat["bits"] == 5 and qat["layers"] == 3 * 6
    assert summary["status"] == "done"


def test_a_pattern_selecting_nothing_qat_may_touch_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, "qat.enabled=true", "qat.pattern=^tok_emb", "train.iterations=2")
    with pytest.raises(ValueError, match="matches no linear layer whose role allows quantization-aware"):
        run_training(cfg, console=False)
