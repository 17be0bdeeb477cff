"""The records' switches of pgolf.model.attention: exclusive self-attention (XSA) and partial,
fp32 or length-rescaled RoPE, each against float64 formulas written here from the definitions;
with the switches at their defaults the attention is bit for bit the official one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgolf.model.attention import Rotary, apply_rotary, exclude_self_value
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT, model_config_problems
from tests.model.test_model import randomise

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2)
F64 = torch.float64


def reference_attention(attn, x, v_extra=None, rope_dims=0, base=10000.0, ref_len=0, xsa=False):
    """One attention layer in float64 from its weights: GQA (head h reads KV head h // (H / Hkv)),
    RMS-normed Q/K, RoPE on the first rope_dims dims of each head (pairs (i, i + rope_dims/2),
    frequency base^(-2i/rope_dims); base * (T / ref_len)^(d / (d - 2)) when T > ref_len > 0),
    v_extra added to the values, XSA: minus each output's component along its own value; with the
    output gate (model.attn_gate_dims = k), head h times sigmoid(scale * gate[h] . x[:k])."""
    W = {n: p.detach().double() for n, p in attn.named_parameters()}
    x = x.double()
    B, T, d = x.shape
    H, Hkv = attn.num_heads, attn.num_kv_heads
    hd = d // H
    rd = rope_dims or hd
    if ref_len and T > ref_len:
        base = base * (T / ref_len) ** (rd / (rd - 2))
    angles = torch.arange(T, dtype=F64)[:, None] * base ** (-torch.arange(0, rd, 2, dtype=F64) / rd)
    cos, sin = angles.cos(), angles.sin()
    eps = torch.finfo(torch.float32).eps

    def rms(t):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps)

    def rope(t):
        out, a, b = t.clone(), t[..., : rd // 2], t[..., rd // 2: rd]
        out[..., : rd // 2], out[..., rd // 2: rd] = a * cos + b * sin, b * cos - a * sin
        return out

    def heads(t, n):
        return t.reshape(B, T, n, hd).permute(0, 2, 1, 3)

    v = x @ W["c_v.weight"].T
    if v_extra is not None:
        v = v + v_extra
    q = rope(rms(heads(x @ W["c_q.weight"].T, H))) * W["q_gain"][None, :, None, None]
    k = rope(rms(heads(x @ W["c_k.weight"].T, Hkv)))
    group = [h // (H // Hkv) for h in range(H)]
    k, v = k[:, group], heads(v, Hkv)[:, group]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    y = torch.softmax(scores, -1) @ v
    if xsa:
        v_hat = v / v.norm(dim=-1, keepdim=True)
        y = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
    if getattr(attn, "gate", None) is not None:
        g = torch.sigmoid(attn.gate_scale * (x[..., : W["gate"].size(1)] @ W["gate"].T))  # (B, T, H)
        y = y * g.permute(0, 2, 1)[..., None]
    return y.permute(0, 2, 1, 3).reshape(B, T, d) @ W["proj.weight"].T


def tiny(**keys) -> GPT:
    torch.manual_seed(0)
    return randomise(GPT(ModelConfig(**{**TINY, **keys})), seed=2)


# ----------------------------------------------------------------------------------------
# XSA
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads", [(8, 4), (8, 1), (4, 4), (6, 2)])
def test_xsa_output_is_orthogonal_to_its_own_value_in_every_head(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, heads, 5, 16, generator=g), torch.randn(2, kv_heads, 5, 16, generator=g)
    out = exclude_self_value(y, v).double()
    yd, vd = y.double(), v.double()
    for h in range(heads):
        v_hat = vd[:, h // (heads // kv_heads)]
        v_hat = v_hat / v_hat.norm(dim=-1, keepdim=True)
        assert (out[:, h] * v_hat).sum(-1).abs().max() < 1e-5  # nothing left along v_hat
        removed = yd[:, h] - out[:, h]  # and only the component along v_hat was removed
        assert torch.allclose(removed, (yd[:, h] * v_hat).sum(-1, keepdim=True) * v_hat, atol=1e-5)
    if kv_heads not in (1, heads):  # the grouping is SDPA's (consecutive heads share a KV head), not h % Hkv
        wrong = vd[:, 1 % kv_heads] / vd[:, 1 % kv_heads].norm(dim=-1, keepdim=True)
        assert (out[:, 1] * wrong).sum(-1).abs().max() > 1e-2


def test_xsa_in_the_attention_acts_on_the_outputs_before_the_projection():
    model = tiny(xsa_layers=[-1])
    attn = model.blocks[3].attn
    assert attn.xsa and not any(b.attn.xsa for b in model.blocks[:3])
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(32))  # the projection's input is visible
        x = torch.randn(2, 7, 32)
        y = attn(x).double().reshape(2, 7, 4, 8)
        v = attn.c_v(x).double().reshape(2, 7, 2, 8)
    v_hat = F.normalize(v, dim=-1)
    for h in range(4):
        assert (y[:, :, h] * v_hat[:, :, h // 2]).sum(-1).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------
# The attention against the reference, switches on and off
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys", [
    dict(),
    dict(xsa_layers=[0, 1, 2, 3]),
    dict(rope_dims=4),
    dict(rope_dims=4, rope_ref_len=5, xsa_layers=[-4]),  # T = 11 > 5: the rescaled base
    dict(rope_ref_len=5, rope_fp32=True),
    dict(num_kv_heads=1, rope_dims=2, xsa_layers=[0]),
])
def test_attention_matches_reference(keys):
    model = tiny(**keys)
    cfg = model.cfg
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(3))
    attn = model.blocks[0].attn
    with torch.no_grad():
        got = attn(x).double()
    ref = reference_attention(attn, x, rope_dims=cfg.rope_dims, ref_len=cfg.rope_ref_len, xsa=0 in
                              {i % 4 for i in cfg.xsa_layers})
    assert torch.allclose(got, ref, atol=1e-5) and ref.abs().max() > 0.1


# ----------------------------------------------------------------------------------------
# Partial RoPE, the rescaled base, fp32 angles
# ----------------------------------------------------------------------------------------

def test_partial_rope_rotates_the_first_dims_and_passes_the_rest():
    rotary = Rotary(16, 10000.0, dims=8)
    q, k = torch.randn(2, 3, 9, 16), torch.randn(2, 1, 9, 16)
    rq, rk = rotary(q, k)
    assert torch.equal(rq[..., 8:], q[..., 8:]) and torch.equal(rk[..., 8:], k[..., 8:])
    angles = torch.arange(9, dtype=F64)[:, None] * 10000.0 ** (-torch.arange(0, 8, 2, dtype=F64) / 8)
    for i in range(4):  # pair (i, i + 4) turns by position x 10000^(-2i/8)
        a, b, theta = q[..., i].double(), q[..., i + 4].double(), angles[:, i]
        assert torch.allclose(rq[..., i].double(), a * theta.cos() + b * theta.sin(), atol=1e-5)
        assert torch.allclose(rq[..., i + 4].double(), b * theta.cos() - a * theta.sin(), atol=1e-5)


def test_rope_dims_equal_to_the_head_is_the_full_rope_bit_for_bit():
    torch.manual_seed(1)
    full = GPT(ModelConfig(**TINY))
    torch.manual_seed(1)
    same = GPT(ModelConfig(**TINY, rope_dims=8))
    tokens = torch.randint(0, 64, (2, 12))
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), same.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(full.logits(tokens), same.logits(tokens))


def test_rescaled_base_at_twice_the_reference_length():
    rotary = Rotary(64, 10000.0, dims=16, ref_len=1024)
    assert rotary.base_at(2048) == pytest.approx(1e4 * 2 ** (16 / 14)) == pytest.approx(22081.79, abs=0.01)
    assert rotary.base_at(1024) == 1e4 and Rotary(64, 1e4, ref_len=1024).base_at(4096) == pytest.approx(1e4 * 4 ** (64 / 62))
    cos, sin = rotary.tables(2048, torch.device("cpu"), torch.float32)
    angles = torch.arange(2048, dtype=F64)[:, None] * 22081.790273476247 ** (-torch.arange(0, 16, 2, dtype=F64) / 16)
    assert torch.allclose(cos[0, 0].double(), angles.cos(), atol=2e-4)
    assert torch.allclose(sin[0, 0].double(), angles.sin(), atol=2e-4)
    assert not torch.allclose(cos, Rotary(64, 10000.0, dims=16).tables(2048, torch.device("cpu"), torch.float32)[0])


def test_rope_tables_at_or_below_the_reference_length_are_unchanged():
    plain, ref = Rotary(32, 10000.0), Rotary(32, 10000.0, ref_len=64)
    for n in (17, 64):
        assert all(torch.equal(a, b) for a, b in zip(plain.tables(n, torch.device("cpu"), torch.float32),
                                                     ref.tables(n, torch.device("cpu"), torch.float32)))


def test_fp32_angles_in_a_bf16_model():
    default, fp32 = tiny().bfloat16(), tiny(rope_fp32=True).bfloat16()
    cpu = torch.device("cpu")
    angles = torch.outer(torch.arange(512, dtype=torch.float32), 1.0 / 10000.0 ** (torch.arange(0, 8, 2) / 8))
    cos = fp32.blocks[0].attn.position.tables(512, cpu, torch.bfloat16)[0][0, 0]
    assert torch.equal(cos, angles.cos().to(torch.bfloat16))
    # the official path builds positions in bf16: above 256 they round, and the angles differ
    assert not torch.equal(default.blocks[0].attn.position.tables(512, cpu, torch.bfloat16)[0][0, 0], cos)


def test_fp32_angles_change_nothing_in_an_fp32_model():
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(tiny().logits(tokens), tiny(rope_fp32=True).logits(tokens))


def test_apply_rotary_is_the_official_rotation_on_full_heads():
    x, cos, sin = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    x1, x2 = x[..., :4], x[..., 4:]
    assert torch.equal(apply_rotary(x, cos, sin), torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), -1))


# ----------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, message", [
    (dict(rope_dims=3), "model.rope_dims must be even and at most the head size model_dim / num_heads = 8"),
    (dict(rope_dims=10), "model.rope_dims must be even and at most the head size"),
    (dict(rope_dims=2, rope_ref_len=1024), "model.rope_ref_len scales the base"),
    (dict(xsa_layers=[-5]), "model.xsa_layers lists layers [-5] that model.num_layers=4 does not have"),
    (dict(xsa_layers=[0, -4]), "model.xsa_layers=[0, -4] names a layer twice"),
])
def test_attention_keys_are_checked(keys, message):
    problems = model_config_problems(ModelConfig(**{**TINY, **keys}))
    assert any(message in p for p in problems), problems
    assert model_config_problems(ModelConfig(**TINY, rope_dims=8, rope_ref_len=4, xsa_layers=[-4, 1, 2, 3])) == []
