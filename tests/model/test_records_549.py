"""PR #549's model as config switches: its parameter count, its forward against a float64
reference written here from the definitions (RECORDS.md A2-A8), LN scale, the orthogonal init,
the config keys, and every switch off leaving the official model bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.config import Config, ConfigError, apply_mapping, apply_overrides
from pgolf.config.checks import validate
from pgolf.lab.plan import count_parameters_by_component
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT, count_parameters, model_config_problems
from tests.model.test_attention_records import reference_attention
from tests.model.test_model import randomise

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

RECORD_549 = dict(num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp="leaky_relu2", mlp_mult=3,
                  embed=["bigram"], bigram_buckets=1536, bigram_dim=128, post_norm=["smear"], stream=["value_embed"],
                  ve_dim=128, ve_layers=[9, 10], xsa_layers=[-4, -3, -2, -1], rope_dims=16, rope_fp32=True,
                  rope_ref_len=1024, ln_scale=True, init="orthogonal")
TINY = dict(vocab_size=64, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2)
# Every switch on, small: bigram 97 x 16, value embeddings (width 8) in layers 3 and 4, XSA in the
# last 2, RoPE on 4 of 8 dims rescaled above 6 positions, LN scale, a leaky relu^2 MLP.
TINY_549 = dict(**TINY, mlp="leaky_relu2", mlp_mult=3, embed=["bigram"], bigram_buckets=97, bigram_dim=16,
                post_norm=["smear"], stream=["value_embed"], ve_dim=8, ve_layers=[-2, -1], xsa_layers=[3, 4],
                rope_dims=4, rope_fp32=True, rope_ref_len=6, ln_scale=True, init="orthogonal")


def test_the_records_parameter_count():
    cfg = ModelConfig(**RECORD_549)
    assert model_config_problems(cfg) == []
    with torch.device("meta"):
        model = GPT(cfg)
    assert count_parameters(model) == 26_928_220  # PR #549's log
    # The planner counts the add-ons too, each in its component.
    blocks = 11 * (512 * 512 * 2 + 256 * 512 * 2)
    assert count_parameters_by_component(model) == {
        "embedding": 1024 * 512 + 1536 * 128 + 128 * 512 + 1024 * 128 + 128 * 256,  # tables and their projections
        "attention": blocks, "mlp": 11 * 2 * 1536 * 512,
        "control": 5 * 512 + 11 * (4 * 512 + 8) + 1 + 512 + 1 + 2,  # skips, blocks, bigram/smear/VE/lambda gates
        "other": 0, "total": 26_928_220}


# ----------------------------------------------------------------------------------------
# The whole forward against a float64 reference
# ----------------------------------------------------------------------------------------

def reference_549(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    cfg, P = model.cfg, {n: p.detach().double() for n, p in model.named_parameters()}
    n, eps = cfg.num_layers, torch.finfo(torch.float32).eps

    def rms(t):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps)

    def shifted(t):  # t_{i-1}, zero at each row's first position
        return torch.cat((torch.zeros_like(t[:, :1]), t[:, :-1]), 1)

    rows = tokens.tolist()
    buckets = torch.tensor([[96] + [((36313 * t) ^ (27191 * p)) % 96 for p, t in zip(r, r[1:])] for r in rows])
    x = P["tok_emb.weight"][tokens] + P["embed_addons.0.scale"] * (
        P["embed_addons.0.table.weight"][buckets] @ P["embed_addons.0.proj.weight"].T)
    x = rms(x)
    s = torch.sigmoid(P["post_norm_addons.0.gate"])
    x = x0 = (1 - s) * x + s * shifted(x)
    ve = P["stream_addons.0.scale"] * (P["stream_addons.0.table.weight"][tokens] @ P["stream_addons.0.proj.weight"].T)

    def block(i, x):
        pre, f = f"blocks.{i}.", 1 / math.sqrt(i + 1)
        x = P[pre + "resid_mix"][0] * x + P[pre + "resid_mix"][1] * x0
        extra = P[pre + "attn.ve_scale"] * ve if i >= n - 2 else None
        attn = reference_attention(model.blocks[i].attn, (rms(x) * f).float(), v_extra=extra, rope_dims=4,
                                   ref_len=6, xsa=i >= n - 2)
        x = x + P[pre + "attn_scale"] * attn
        h = rms(x) * f @ P[pre + "mlp.fc.weight"].T
        h = torch.where(h > 0, h, 0.5 * h) ** 2
        return x + P[pre + "mlp_scale"] * (h @ P[pre + "mlp.proj.weight"].T)

    skips = []
    for i in range(n // 2):
        x = block(i, x)
        skips.append(x)
    for j, i in enumerate(range(n // 2, n)):
        if skips:
            x = x + P["skip_weights"][j] * skips.pop()
        x = block(i, x)
    z = rms(x) @ P["tok_emb.weight"].T
    return cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)


def test_forward_matches_the_reference():
    # reference_attention takes its input in fp32 (the module's dtype): compare at fp32 accuracy.
    torch.manual_seed(0)
    model = randomise(GPT(ModelConfig(**TINY_549)), seed=4)
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.logits(tokens).double()
    ref = reference_549(model, tokens)
    assert torch.allclose(got, ref, atol=2e-4) and ref.abs().max() > 1.0


def test_the_records_switches_train_on_cpu():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY_549))
    tokens = torch.randint(0, 64, (2, 13))
    loss = model(tokens, tokens.roll(-1, 1))
    assert abs(loss.item() - math.log(64)) < 0.1
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# LN scale and the orthogonal init
# ----------------------------------------------------------------------------------------

def test_ln_scale_divides_each_blocks_inputs_by_sqrt_of_its_depth():
    model = GPT(ModelConfig(**TINY, ln_scale=True))
    seen = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda m, args: seen.append(("attn", args[0])))
        block.mlp.register_forward_pre_hook(lambda m, args: seen.append(("mlp", args[0])))
    with torch.no_grad():
        model.logits(torch.randint(0, 64, (2, 9)))
    for i in range(5):  # the RMS of an RMS-normed input is 1; scaled: 1 / sqrt(i + 1)
        for kind, x in seen[2 * i: 2 * i + 2]:
            assert x.pow(2).mean(-1).sqrt().sub(1 / math.sqrt(i + 1)).abs().max() < 1e-3, (kind, i)


def is_orthogonal(w: torch.Tensor) -> bool:
    w = w.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("mlp", ["relu2", "swiglu"])
def test_orthogonal_init_as_549(mlp):
    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp=mlp,
                      embed=["bigram"], bigram_dim=96, stream=["value_embed"], ve_dim=64, init="orthogonal")
    torch.manual_seed(0)
    model = GPT(cfg)
    inputs = ("gate", "up") if mlp == "swiglu" else ("fc",)
    for block in model.blocks:  # Q, K (32 x 64), V, the MLP's inputs: orthogonal; outputs: zero
        attn = block.attn
        assert all(is_orthogonal(m.weight) for m in (attn.c_q, attn.c_k, attn.c_v))
        assert all(is_orthogonal(getattr(block.mlp, name).weight) for name in inputs)
        assert torch.count_nonzero(attn.proj.weight) == 0 and torch.count_nonzero(block.mlp.proj.weight) == 0
    assert is_orthogonal(model.embed_addons[0].proj.weight)  # 64 x 96: both sides >= 64
    ve_proj = model.stream_addons[0].proj.weight  # 32 x 64: left at its default, as #549's rule says
    assert not is_orthogonal(ve_proj) and ve_proj.abs().max() <= 1 / math.sqrt(64)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.1)
    assert torch.count_nonzero(model.embed_addons[0].table.weight) == 0


def test_orthogonal_init_changes_only_the_linears():
    torch.manual_seed(0)
    default = GPT(ModelConfig(**TINY))
    torch.manual_seed(0)
    orthogonal = GPT(ModelConfig(**TINY, init="orthogonal"))
    changed = {n for n, p in default.state_dict().items() if not torch.equal(p, orthogonal.state_dict()[n])}
    assert changed == {f"blocks.{i}.{m}.weight" for i in range(5) for m in ("attn.c_q", "attn.c_k", "attn.c_v", "mlp.fc")}


# ----------------------------------------------------------------------------------------
# Off: the official model bit for bit
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys", [
    dict(xsa_layers=[], rope_dims=0, rope_fp32=False, rope_ref_len=0, ln_scale=False, init="default"),
    dict(rope_dims=8),  # the whole head
    dict(rope_ref_len=12),  # sequences no longer than the reference length
    dict(rope_fp32=True),  # an fp32 model's angles are fp32 already
    dict(ve_layers=[-2, -1], bigram_buckets=1536),  # add-on keys at their defaults, add-ons off
])
def test_switches_off_are_the_official_model_bit_for_bit(keys):
    assert_off_is_official(TINY, keys)


def assert_off_is_official(shape: dict, keys: dict) -> None:
    """The model with `keys` equals the official one of `shape`: same initial state, same logits."""
    torch.manual_seed(5)
    official = GPT(ModelConfig(**shape))
    torch.manual_seed(5)
    model = GPT(ModelConfig(**shape, **keys))
    assert model_config_problems(model.cfg) == []
    a, b = official.state_dict(), model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(official.logits(tokens), model.logits(tokens))


# ----------------------------------------------------------------------------------------
# The config keys
# ----------------------------------------------------------------------------------------

def test_layer_lists_from_the_command_line_and_toml_agree():
    cli, toml = Config(), Config()
    apply_overrides(cli, ["model.num_layers=11", "model.xsa_layers=-4,-3,-2,-1", "model.stream=value_embed",
                          "model.ve_layers=9,10", "model.embed=bigram", "model.post_norm=smear", "model.init=orthogonal"])
    apply_mapping(toml, {"model": {"num_layers": 11, "xsa_layers": [-4, -3, -2, -1], "stream": ["value_embed"],
                                   "ve_layers": [9, 10], "embed": ["bigram"], "post_norm": ["smear"],
                                   "init": "orthogonal"}}, origin="test")
    assert cli == toml and cli.model.xsa_layers == [-4, -3, -2, -1] and cli.model.ve_layers == [9, 10]
    validate(cli)
    empty = Config()
    apply_overrides(empty, ["model.xsa_layers="])
    assert empty.model.xsa_layers == []


@pytest.mark.parametrize("override", ["model.xsa_layers=last", "model.ve_layers=1.5", "model.xsa_layers=a:1"])
def test_layer_lists_must_be_integers(override):
    with pytest.raises(ConfigError, match=override.split("=")[0] + ": cannot read"):
        apply_overrides(Config(), [override])


def test_init_must_be_known():
    assert model_config_problems(ModelConfig(init="xavier")) == ["model.init must be default or orthogonal, got 'xavier'"]
