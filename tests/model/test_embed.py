"""The token-table add-ons of pgolf.model.embed (#549's BigramHash, SmearGate, value embeddings):
each against float64 formulas written here from their definitions, their roles, optimizer
groups and export treatment, and their config checks."""

from __future__ import annotations

import pytest
import torch

from pgolf.config import OptimConfig
from pgolf.model.config import ModelConfig
from pgolf.model.embed import BigramHash, SmearGate, ValueEmbedding, bigram_buckets
from pgolf.model.gpt import GPT, model_config_problems
from pgolf.model.roles import ROLE_TABLE, Role, component_of, export_treatment, param_roles
from pgolf.train.optim import build_optimizers
from tests.model.test_attention_records import reference_attention
from tests.model.test_model import randomise

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2)
ALL_ON = dict(embed=["bigram"], post_norm=["smear"], stream=["value_embed"], bigram_buckets=97, bigram_dim=16,
              ve_dim=8, ve_layers=[1, -1])


def ids(seed: int, shape=(2, 9), vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# BigramHash
# ----------------------------------------------------------------------------------------

def test_bigram_buckets_by_hand():
    # (36313 t XOR 27191 p) mod 1535, worked out by hand for (p, t):
    # (5, 7): 254191 ^ 135955 = 127996 -> 591;  (7, 1000): 36313000 ^ 190337 = 36237353 -> 608;
    # (1000, 3): 108939 ^ 27191000 = 27217747 -> 662; (1023, 1023) -> 121; (1023, 0): 27816393 -> 658;
    # (0, 1): 36313 -> 1008. Each row's first position: bucket 1535.
    tokens = torch.tensor([[5, 7, 1000, 3], [1023, 1023, 0, 1]])
    assert bigram_buckets(tokens, 1536).tolist() == [[1535, 591, 608, 662], [1535, 121, 658, 1008]]


def test_bigram_buckets_match_python_integers():
    tokens = ids(0, (3, 50), vocab=8192)  # the largest vocabularies the records use: no int32 overflow
    got = bigram_buckets(tokens, 3072)
    for row, out in zip(tokens.tolist(), got.tolist()):
        assert out == [3071] + [((36313 * t) ^ (27191 * p)) % 3071 for p, t in zip(row, row[1:])]
    assert got.dtype == torch.long


def test_bigram_forward_matches_formula():
    cfg = ModelConfig(**TINY, bigram_buckets=97, bigram_dim=16)
    torch.manual_seed(0)
    addon = BigramHash(cfg)
    assert torch.count_nonzero(addon.table.weight) == 0 and addon.scale.item() == pytest.approx(0.05)
    with torch.no_grad():
        addon.table.weight.normal_()
    x, tokens = torch.randn(2, 9, 32), ids(1)
    E, P, s = (t.detach().double() for t in (addon.table.weight, addon.proj.weight, addon.scale))
    rows = tokens.tolist()
    buckets = torch.tensor([[96] + [((36313 * t) ^ (27191 * p)) % 96 for p, t in zip(r, r[1:])] for r in rows])
    expected = x.double() + s * (E[buckets] @ P.T)
    with torch.no_grad():
        assert torch.allclose(addon(x, tokens).double(), expected, atol=1e-6)


def test_bigram_without_projection_when_widths_match():
    addon = BigramHash(ModelConfig(**TINY, bigram_dim=32))
    assert addon.proj is None and sum(p.numel() for p in addon.parameters()) == 1536 * 32 + 1


# ----------------------------------------------------------------------------------------
# SmearGate
# ----------------------------------------------------------------------------------------

def test_smear_matches_formula():
    smear = SmearGate(ModelConfig(**TINY))
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.allclose(smear(x, ids(0, (2, 7))), 0.5 * x + 0.5 * torch.cat((torch.zeros(2, 1, 32), x[:, :-1]), 1))
        smear.gate.copy_(torch.randn(32))
        got = smear(x, ids(0, (2, 7))).double()
    s = torch.sigmoid(smear.gate.detach().double())
    xd = x.double()
    for t in range(7):
        previous = xd[:, t - 1] if t else torch.zeros_like(xd[:, 0])
        assert torch.allclose(got[:, t], (1 - s) * xd[:, t] + s * previous, atol=1e-6)


def test_post_norm_addon_runs_after_the_norm_and_gives_x0():
    # With everything else zero, a block adds nothing: the output is norm(smear(norm(embedding))).
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, post_norm=["smear"]))
    tokens = ids(2)
    rms = lambda t: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)  # noqa: E731
    x = rms(model.tok_emb.weight.detach().double()[tokens])
    smeared = 0.5 * x + 0.5 * torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1)
    with torch.no_grad():
        for block in model.blocks:
            block.resid_mix.copy_(torch.tensor([[0.0], [1.0]]).expand(2, 32))  # each block returns x0
        assert torch.allclose(model.hidden_states(tokens).double(), rms(smeared), atol=1e-5)


# ----------------------------------------------------------------------------------------
# Value embeddings
# ----------------------------------------------------------------------------------------

def test_value_embedding_hands_over_the_scaled_projection():
    cfg = ModelConfig(**TINY, stream=["value_embed"], ve_dim=8)
    torch.manual_seed(0)
    addon = ValueEmbedding(cfg)
    assert addon.table.weight.std().item() == pytest.approx(0.01, rel=0.2) and addon.scale.item() == pytest.approx(0.1)
    assert addon.proj.weight.shape == (16, 8)  # to the K/V width: 2 KV heads x head size 8
    tokens = ids(3)
    E, P, s = (t.detach().double() for t in (addon.table.weight, addon.proj.weight, addon.scale))
    with torch.no_grad():
        out = addon(tokens, torch.zeros(2, 9, 32))
    assert set(out) == {"value_embed"}
    assert torch.allclose(out["value_embed"].double(), s * (E[tokens] @ P.T), atol=1e-7)


@pytest.mark.parametrize("layers, chosen", [([-2, -1], {2, 3}), ([0, 2], {0, 2}), ([-4], {0})])
def test_one_value_embedding_scalar_per_listed_layer(layers, chosen):
    model = GPT(ModelConfig(**TINY, stream=["value_embed"], ve_layers=layers))
    scalars = {name for name, _ in model.named_parameters() if name.endswith("ve_scale")}
    assert scalars == {f"blocks.{i}.attn.ve_scale" for i in chosen}
    assert all(model.blocks[i].attn.ve_scale.item() == 1.0 for i in chosen)
    assert all(model.blocks[i].attn.ve_scale is None for i in set(range(4)) - chosen)


def test_value_embedding_is_added_to_the_values_of_listed_layers_only():
    torch.manual_seed(0)
    model = randomise(GPT(ModelConfig(**TINY, stream=["value_embed"], ve_dim=8, ve_layers=[1])), seed=1)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        extras = model.stream_addons[0](ids(4), x)
    for i in (0, 1):  # layer 1 attends over c_v x + lambda_1 (s P E[t]); layer 0 over c_v x
        attn = model.blocks[i].attn
        added = None if i == 0 else attn.ve_scale.detach().double() * extras["value_embed"].double()
        with torch.no_grad():
            got = attn(x, extras).double()
        assert torch.allclose(got, reference_attention(attn, x, v_extra=added), atol=1e-5)
    assert not torch.allclose(got, reference_attention(attn, x), atol=1e-2)  # and it matters


# ----------------------------------------------------------------------------------------
# Roles, optimizer groups, export; config checks
# ----------------------------------------------------------------------------------------

def test_roles_groups_and_export_of_the_addons():
    model = GPT(ModelConfig(**TINY, **ALL_ON))
    roles = param_roles(model)
    expected = {
        "embed_addons.0.table.weight": Role.EMBEDDING, "embed_addons.0.proj.weight": Role.SIDE_MATRIX,
        "embed_addons.0.scale": Role.GATE, "post_norm_addons.0.gate": Role.GATE,
        "stream_addons.0.table.weight": Role.EMBEDDING, "stream_addons.0.proj.weight": Role.SIDE_MATRIX,
        "stream_addons.0.scale": Role.GATE, "blocks.1.attn.ve_scale": Role.GATE, "blocks.3.attn.ve_scale": Role.GATE,
    }
    assert {n: roles[n] for n in expected} == expected
    assert set(roles) - set(expected) == set(param_roles(GPT(ModelConfig(**TINY))))  # nothing else is new
    cfg = OptimConfig()
    opts = build_optimizers(model, cfg, torch.device("cpu"))  # exactly one group each (check_one_group_each)

    def group_of(name):
        p = model.get_parameter(name)
        return [(opt, g["lr"]) for opt in ("adam_token", "muon", "adam_scalar", "adam_head")
                for g in (getattr(opts, opt).param_groups if getattr(opts, opt) else []) if any(q is p for q in g["params"])]

    for name, role in expected.items():
        want = ("adam_token", cfg.tied_embed_lr) if role is Role.EMBEDDING else ("adam_scalar", cfg.scalar_lr)
        assert group_of(name) == [want], name
    export = export_treatment(model)  # the scalars as fp16 (as #549's small tensors), the rest quantized
    assert {n: export[n] for n in expected} == {n: ROLE_TABLE[r].export for n, r in expected.items()}
    assert all((export[n] == "fp16") == (r is Role.GATE) for n, r in expected.items())
    components = {n: component_of(model, n) for n in expected}
    assert components == {n: "control" if r is Role.GATE else "embedding" for n, r in expected.items()}


def test_every_addon_parameter_learns():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, **ALL_ON))
    tokens = ids(5)
    model(tokens, tokens.roll(-1, 1)).backward()
    for name, p in model.named_parameters():
        if "addons" in name or "ve_scale" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # At init the bigram table is zero and its gradient is not: the projection is not zero.
    assert model.embed_addons[0].table.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("keys, message", [
    (dict(ve_layers=[0]), "model.ve_layers applies only with model.stream including value_embed"),
    (dict(ve_dim=64), "model.ve_dim applies only with model.stream including value_embed"),
    (dict(bigram_dim=64), "model.bigram_dim applies only with model.embed including bigram"),
    (dict(bigram_buckets=100), "model.bigram_buckets applies only with model.embed including bigram"),
    (dict(stream=["value_embed"], ve_layers=[]), "model.stream=value_embed needs model.ve_layers"),
    (dict(stream=["value_embed"], ve_layers=[4]), "model.ve_layers lists layers [4] that model.num_layers=4"),
    (dict(stream=["value_embed"], ve_layers=[3, -1]), "model.ve_layers=[3, -1] names a layer twice"),
])
def test_addon_keys_are_checked(keys, message):
    problems = model_config_problems(ModelConfig(**{**TINY, **keys}))
    assert any(message in p for p in problems), problems


def test_the_records_values_pass():
    assert model_config_problems(ModelConfig(**{**TINY, **ALL_ON})) == []
    assert model_config_problems(ModelConfig(num_layers=11, embed=["bigram"], stream=["value_embed"],
                                             ve_layers=[9, 10])) == []
