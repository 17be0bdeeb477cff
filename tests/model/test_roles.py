"""Parameter roles: every parameter of every preset shape has one, they agree with the name
patterns they replaced, they survive the ways torch copies modules, and the table is complete."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pgolf.config import Config, apply_overrides
from pgolf.config.resolve import REPO_CONFIG_DIR, resolve_config
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT, build_model
from pgolf.compress.quant import CONTROL_PATTERNS
from pgolf.model.roles import (ROLE_TABLE, Role, UntaggedParameterError, component_of, export_passthrough,
                               lr_key, param_roles, qat_eligible_names,
                               role_of, tag)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY = dict(vocab_size=64, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2)
PRESETS = sorted(p.stem for p in REPO_CONFIG_DIR.glob("*.toml"))
# The shapes tests/golden/record_treatment.py pins, plus every MLP variant.
SHAPES = {
    "untied_head": ["model.tie_embeddings=false"],
    "recurrence_swiglu": ["model.recurrence=2", "model.mlp=swiglu"],
    "middle_cycle": ["model.cycle_stem=1", "model.cycle_core=3", "model.cycle_repeats=2", "model.cycle_tail=1"],
    "gelu": ["model.mlp=gelu"], "silu": ["model.mlp=silu"], "leaky_relu2": ["model.mlp=leaky_relu2"],
}


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}))


def preset_model(preset: str) -> GPT:
    cfg, _ = resolve_config(preset, [], env={})
    with torch.device("meta"):  # shapes and roles only: no memory, no init arithmetic
        return GPT(cfg.model)


def shape_model(overrides: list[str]) -> GPT:
    cfg = Config()
    apply_overrides(cfg, ["model.num_layers=5", "model.model_dim=64", *overrides])
    with torch.device("meta"):
        return GPT(cfg.model)


ADDON_PREFIXES = ("embed_addons.", "post_norm_addons.", "stream_addons.")


def legacy_role(model: GPT, name: str, param: torch.Tensor) -> Role:
    """How pgolf classified a parameter before roles: name patterns and the module it sits in."""
    if param.ndim < 2 or any(p in name for p in CONTROL_PATTERNS):
        return Role.CONTROL
    if name == "tok_emb.weight":
        return Role.EMBEDDING
    if name == "lm_head.weight":
        return Role.HEAD
    return Role.MATRIX


@pytest.mark.parametrize("model_of", [pytest.param(lambda p=p: preset_model(p), id=p) for p in PRESETS]
                         + [pytest.param(lambda o=o: shape_model(o), id=s) for s, o in SHAPES.items()])
def test_every_parameter_has_the_role_the_name_patterns_gave(model_of):
    model = model_of()
    roles = param_roles(model)
    assert list(roles) == [name for name, _ in model.named_parameters()]  # same names, same order
    # The name patterns predate the add-ons (their roles: tests/model/test_embed.py) and #1855's
    # gates (skip gates, attention output gates: Role.GATE).
    def newer(name: str) -> bool:
        return name.startswith(ADDON_PREFIXES) or name.endswith(".ve_scale") or roles[name] is Role.GATE

    legacy = {name: role for name, role in roles.items() if not newer(name)}
    assert legacy == {name: legacy_role(model, name, p) for name, p in model.named_parameters() if name in legacy}
    assert len(roles) - len(legacy) == sum(p.numel() > 0 for n, p in model.named_parameters() if newer(n))
    assert all(role_of(model, name) is role for name, role in roles.items())


def test_baseline_roles_by_name():
    roles = param_roles(tiny(tie_embeddings=False))
    assert roles["tok_emb.weight"] is Role.EMBEDDING and roles["lm_head.weight"] is Role.HEAD
    assert roles["skip_weights"] is Role.CONTROL
    for leaf in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain"):
        assert roles[f"blocks.2.{leaf}"] is Role.CONTROL
    for leaf in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"):
        assert roles[f"blocks.2.{leaf}.weight"] is Role.MATRIX


def test_an_untagged_parameter_is_refused_by_name():
    model = tiny()
    model.blocks[1].mlp.bias = nn.Parameter(torch.zeros(32))
    model.extra_table = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(UntaggedParameterError, match=r"without a role: extra_table, blocks\.1\.mlp\.bias;"):
        param_roles(model)
    with pytest.raises(UntaggedParameterError, match=r"'blocks\.1\.mlp\.bias'"):
        role_of(model, "blocks.1.mlp.bias")
    tag(model.blocks[1].mlp, Role.CONTROL, "bias")
    tag(model, Role.MATRIX, "extra_table")
    assert param_roles(model)["blocks.1.mlp.bias"] is Role.CONTROL


def test_tag_refuses_a_name_that_is_not_the_modules_own_parameter():
    model = tiny()
    with pytest.raises(ValueError, match="has no parameter 'nope'"):
        tag(model, Role.CONTROL, "nope")
    with pytest.raises(ValueError, match="has no parameter 'blocks.0.attn_scale'"):
        tag(model, Role.CONTROL, "blocks.0.attn_scale")  # a module tags its own parameters only


def test_roles_survive_copies_and_conversions():
    """Why roles live on modules: deepcopy, to_empty and dtype casts keep them."""
    expected = param_roles(tiny(tie_embeddings=False))
    model = tiny(tie_embeddings=False)
    assert param_roles(copy.deepcopy(model)) == expected
    assert param_roles(model.bfloat16()) == expected
    assert param_roles(model.to_empty(device="meta")) == expected


def test_a_shared_parameter_takes_its_first_name():
    model = tiny()
    model.blocks[1].attn_scale = model.blocks[0].attn_scale  # tied: named once, like named_parameters
    assert "blocks.1.attn_scale" not in param_roles(model)
    assert list(param_roles(model)) == [n for n, _ in model.named_parameters()]


def test_role_table_is_complete_and_lr_keys_follow_tying():
    assert set(ROLE_TABLE) == set(Role)
    for role, t in ROLE_TABLE.items():
        assert t.optimizer in ("adam_token", "muon", "adam_scalar", "adam_head"), role
        assert t.export in ("scheme", "int8", "fp32", "fp16"), role
        assert t.lr_key.endswith("_lr") and t.wd_key in ("muon_wd", "adam_wd", "embed_wd"), role
    assert lr_key(Role.EMBEDDING, True) == "tied_embed_lr" and lr_key(Role.EMBEDDING, False) == "embed_lr"
    assert lr_key(Role.MATRIX, True) == "matrix_lr" and lr_key(Role.HEAD, False) == "head_lr"
    assert {r for r, t in ROLE_TABLE.items() if t.qat} == {Role.MATRIX}
    # the records keep embedding tables and the head at int8 under a narrower scheme
    assert {r for r, t in ROLE_TABLE.items() if t.export == "int8"} == {Role.EMBEDDING, Role.HEAD}


@pytest.mark.parametrize("tie", [True, False])
def test_export_and_qat_views(tie):
    model = tiny(tie_embeddings=tie)
    names = [n for n, _ in model.named_parameters()]
    # The export's fp32 passthrough today: names containing one of the control patterns.
    assert {n for n, kind in export_passthrough(model).items() if kind == "fp32"} == \
        {n for n in names if any(p in n for p in CONTROL_PATTERNS)}
    assert set(export_passthrough(model).values()) == {"fp32"}  # no GATE parameters in the baseline
    assert qat_eligible_names(model) == {n for n in names if n.startswith("blocks.") and n.endswith(".weight")}


def test_planner_components():
    model = tiny(tie_embeddings=False)
    assert component_of(model, "tok_emb.weight") == component_of(model, "lm_head.weight") == "embedding"
    assert component_of(model, "blocks.0.attn.c_q.weight") == "attention"
    assert component_of(model, "blocks.0.mlp.proj.weight") == "mlp"
    assert component_of(model, "blocks.0.attn.q_gain") == component_of(model, "skip_weights") == "control"


def test_build_model_casts_each_role_to_its_cuda_dtype(monkeypatch):
    """build_model's CUDA layout replayed on CPU: bf16 body and buffers, each parameter in its
    role's dtype."""
    class FakeCuda:
        type = "cuda"

    monkeypatch.setattr(GPT, "to", lambda self, device: self)
    model = build_model(ModelConfig(**TINY, tie_embeddings=False), FakeCuda())
    roles = param_roles(model)
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: ROLE_TABLE[r].cuda_dtype for n, r in roles.items()}
    assert model.tok_emb.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    assert all(b.dtype == torch.bfloat16 for b in model.buffers())  # RoPE's angles, as the official model
