"""The baseline GPT, pinned to the official architecture by hand-derived numbers and an
independent reference forward pass written here with plain tensor ops (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.config import ModelConfig
from pgolf.model.gpt import GPT, build_model, count_parameters

TINY = dict(vocab_size=64, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}))


@pytest.fixture(scope="module")
def baseline() -> GPT:
    torch.manual_seed(1337)
    return GPT(ModelConfig())


def randomise(model: GPT, seed: int = 0) -> GPT:
    """Give every parameter (zero-initialised ones included) a distinct random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "tok_emb.weight":
                p.copy_(noise)
            elif p.ndim == 2 and "resid_mix" not in name and "skip_weights" not in name:
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:  # control vectors: around 1, so every path contributes
                p.copy_(1.0 + 0.5 * noise)
    return model


# ----------------------------------------------------------------------------------------
# Shapes, parameter count, initialisation
# ----------------------------------------------------------------------------------------

def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, hd = cfg.model_dim, cfg.model_dim // cfg.num_heads
    kv = cfg.num_kv_heads * hd
    shapes = {"tok_emb.weight": (cfg.vocab_size, d), "skip_weights": (cfg.num_layers // 2, d)}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.c_q.weight": (d, d), b + "attn.c_k.weight": (kv, d), b + "attn.c_v.weight": (kv, d),
            b + "attn.proj.weight": (d, d), b + "attn.q_gain": (cfg.num_heads,),
            b + "mlp.fc.weight": (cfg.mlp_mult * d, d), b + "mlp.proj.weight": (d, cfg.mlp_mult * d),
            b + "attn_scale": (d,), b + "mlp_scale": (d,), b + "resid_mix": (2, d),
        })
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def test_baseline_parameter_count_by_hand(baseline):
    embedding = 1024 * 512
    per_block_matrices = (512 * 512) + (256 * 512) + (256 * 512) + (512 * 512) + (1024 * 512) + (512 * 1024)
    per_block_controls = 512 + 512 + 2 * 512 + 8  # attn_scale, mlp_scale, resid_mix, q_gain
    skip_weights = 4 * 512
    expected = embedding + 9 * (per_block_matrices + per_block_controls) + skip_weights
    assert expected == 17_059_912
    assert count_parameters(baseline) == expected


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_names_and_shapes(tie):
    model = tiny(tie_embeddings=tie)
    got = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert got == expected_shapes(model.cfg)
    assert (model.lm_head is None) == tie


def test_baseline_parameter_shapes(baseline):
    got = {name: tuple(p.shape) for name, p in baseline.named_parameters()}
    assert got == expected_shapes(ModelConfig())
    assert baseline.num_encoder_layers == 4 and baseline.num_decoder_layers == 5


@pytest.mark.parametrize("tie", [True, False])
def test_output_projections_are_zero_initialised(tie):
    model = tiny(tie_embeddings=tie)
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.proj.weight) == 0
        assert torch.count_nonzero(block.mlp.proj.weight) == 0
    if not tie:
        assert torch.count_nonzero(model.lm_head.weight) == 0


def test_other_linears_keep_default_kaiming_uniform_init(baseline):
    # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std = bound / sqrt(3).
    for name in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "mlp.fc.weight"):
        w = baseline.get_parameter(f"blocks.0.{name}")
        bound = 1 / math.sqrt(w.shape[1])
        assert w.abs().max() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)


def test_tied_embedding_init_std(baseline):
    w = baseline.tok_emb.weight
    assert w.std().item() == pytest.approx(0.005, rel=0.02)
    assert abs(w.mean().item()) < 1e-4


def test_untied_embedding_keeps_default_normal_init():
    torch.manual_seed(0)
    model = GPT(ModelConfig(tie_embeddings=False))
    assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.02)


def test_control_parameter_inits(baseline):
    for block in baseline.blocks:
        assert torch.equal(block.attn.q_gain, torch.full((8,), 1.5))
        assert torch.equal(block.resid_mix, torch.stack((torch.ones(512), torch.zeros(512))))
        assert torch.equal(block.attn_scale, torch.ones(512))
        assert torch.equal(block.mlp_scale, torch.ones(512))
    assert torch.equal(baseline.skip_weights, torch.ones(4, 512))
    assert all(p.dtype == torch.float32 for p in baseline.parameters())


def test_qk_gain_init_is_configurable():
    model = tiny(qk_gain_init=2.25)
    assert torch.equal(model.blocks[3].attn.q_gain, torch.full((4,), 2.25))


# ----------------------------------------------------------------------------------------
# Loss at init
# ----------------------------------------------------------------------------------------

def test_initial_loss_is_near_uniform_tied(baseline):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 1024, (2, 64), generator=g)
    y = torch.randint(0, 1024, (2, 64), generator=g)
    with torch.no_grad():
        loss = baseline(x, y).item()
    assert abs(loss - math.log(1024)) < 0.05


def test_initial_loss_tiny_tied_and_untied():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (3, 16), generator=g)
    y = torch.randint(0, 64, (3, 16), generator=g)
    with torch.no_grad():
        tied = tiny()(x, y).item()
        untied = tiny(tie_embeddings=False)(x, y).item()
    assert abs(tied - math.log(64)) < 0.02
    # Zero-initialised untied head: every logit is exactly 0, so the loss is exactly ln V.
    assert untied == pytest.approx(math.log(64), abs=1e-6)


# ----------------------------------------------------------------------------------------
# Independent reference forward
# ----------------------------------------------------------------------------------------

def reference_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The baseline architecture re-derived with plain float64 ops from model's parameters."""
    cfg = model.cfg
    P = {name: p.detach().double() for name, p in model.named_parameters()}
    d, H, Hkv = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
    hd = d // H
    B, T = ids.shape
    eps = torch.finfo(torch.float32).eps  # F.rms_norm's default eps for fp32 inputs

    def rms(t):
        return t / torch.sqrt(t.pow(2).mean(dim=-1, keepdim=True) + eps)

    # Rotary: frequency j = base^(-2j/hd); channel pairs are (j, j + hd/2) ("half split").
    freqs = cfg.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()

    def rope(t):
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat((a * cos + b * sin, b * cos - a * sin), dim=-1)

    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))

    def attention(prefix, x):
        q = (x @ P[prefix + "c_q.weight"].T).reshape(B, T, H, hd).permute(0, 2, 1, 3)
        k = (x @ P[prefix + "c_k.weight"].T).reshape(B, T, Hkv, hd).permute(0, 2, 1, 3)
        v = (x @ P[prefix + "c_v.weight"].T).reshape(B, T, Hkv, hd).permute(0, 2, 1, 3)
        q, k = rope(rms(q)), rope(rms(k))
        q = q * P[prefix + "q_gain"][None, :, None, None]
        kv_of_head = [h // (H // Hkv) for h in range(H)]  # GQA: consecutive heads share a kv head
        k, v = k[:, kv_of_head], v[:, kv_of_head]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        y = y.permute(0, 2, 1, 3).reshape(B, T, d)
        return y @ P[prefix + "proj.weight"].T

    def block(i, x, x0):
        pre = f"blocks.{i}."
        mix = P[pre + "resid_mix"]
        x = mix[0] * x + mix[1] * x0
        x = x + P[pre + "attn_scale"] * attention(pre + "attn.", rms(x))
        hidden = torch.relu(rms(x) @ P[pre + "mlp.fc.weight"].T) ** 2
        return x + P[pre + "mlp_scale"] * (hidden @ P[pre + "mlp.proj.weight"].T)

    x = rms(P["tok_emb.weight"][ids])
    x0 = x
    n_enc = cfg.num_layers // 2
    encoder_outputs = []
    for i in range(n_enc):
        x = block(i, x, x0)
        encoder_outputs.append(x)
    for j in range(cfg.num_layers - n_enc):
        if j < n_enc:  # decoder block j gets the encoder output n_enc-1-j (reverse order)
            x = x + P["skip_weights"][j] * encoder_outputs[n_enc - 1 - j]
        x = block(n_enc + j, x, x0)
    x = rms(x)
    head = P["tok_emb.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    z = x @ head.T
    return cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)


def reference_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> float:
    logp = torch.log_softmax(reference_logits(model, x), dim=-1)
    return -logp.gather(-1, y[..., None]).mean().item()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # 5 layers: 2 encoder, 3 decoder, tied, cap 30
        dict(tie_embeddings=False, logit_softcap=3.0),  # a cap that actually bends the logits
        dict(num_layers=4, num_kv_heads=4, rope_base=100.0),  # even depth, MHA (no GQA)
        dict(num_layers=5, num_kv_heads=1, mlp_mult=3, qk_gain_init=0.7),  # MQA
    ],
)
def test_forward_matches_independent_reference(overrides):
    model = randomise(tiny(**overrides), seed=3)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 64, (3, 17), generator=g)
    y = torch.randint(0, 64, (3, 17), generator=g)
    with torch.no_grad():
        logits = model.logits(x)
        loss = model(x, y).item()
    ref = reference_logits(model, x)
    assert logits.shape == (3, 17, 64) and logits.dtype == torch.float32
    assert torch.allclose(logits.double(), ref, atol=1e-4, rtol=1e-5)
    assert loss == pytest.approx(reference_loss(model, x, y), abs=1e-5)
    assert ref.abs().max() > 1.0  # the comparison is not trivially about near-zero logits
    if model.cfg.logit_softcap == 3.0:
        assert ref.abs().max() > 2.0  # the softcap's tanh is in its non-linear range


def test_forward_is_causal():
    model = randomise(tiny(), seed=1)
    x = torch.randint(0, 64, (1, 12))
    x2 = x.clone()
    x2[0, 8:] = (x2[0, 8:] + 1) % 64
    with torch.no_grad():
        a, b = model.logits(x), model.logits(x2)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_sum_reduction_equals_mean_times_count():
    model = randomise(tiny(), seed=2)
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        mean = model(x, y)
        total = model(x, y, reduction="sum")
        per_token = model(x, y, reduction="none")
    assert total.item() == pytest.approx(mean.item() * 32, rel=1e-6)
    assert per_token.shape == (32,) and per_token.sum().item() == pytest.approx(total.item(), rel=1e-6)


def test_build_model_on_cpu_is_fp32():
    model = build_model(ModelConfig(**TINY), torch.device("cpu"))
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers())
    with torch.no_grad():
        assert model.logits(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.float32


@pytest.mark.parametrize("tie", [True, False])
def test_gradients_reach_every_parameter(tie):
    model = randomise(tiny(tie_embeddings=tie), seed=4)
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    model(x, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_gradients_exist_at_init():
    model = tiny()
    x = torch.randint(0, 64, (2, 16))
    model(x, x.roll(-1, 1)).backward()
    assert all(p.grad is not None for p in model.parameters())
    # Zero output projections: the first backward step reaches them (and not q/k/v yet).
    assert model.blocks[0].attn.proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].mlp.proj.weight.grad.abs().sum() > 0


def test_rotary_tables_follow_buffer_dtype_like_official():
    # The official Rotary builds positions with dtype=inv_freq.dtype; the CUDA layout
    # (model.bfloat16(), buffers included) makes that bf16, so positions above 256 round.
    model = tiny().bfloat16()
    rotary = model.blocks[0].attn.position
    assert rotary.inv_freq.dtype == torch.bfloat16
    cos, sin = rotary.tables(512, torch.device("cpu"), torch.bfloat16)
    positions = torch.arange(512, dtype=rotary.inv_freq.dtype)
    assert not torch.equal(positions.float(), torch.arange(512.0))  # bf16 really rounds here
    angles = torch.outer(positions, rotary.inv_freq)
    assert torch.equal(cos[0, 0], angles.cos().to(torch.bfloat16))
    assert torch.equal(sin[0, 0], angles.sin().to(torch.bfloat16))
