"""The model's slot registries: every entry builds and trains (forward, backward, roles,
optimizer groups), unknown names are refused with the options, registration stays static, and
the add-on hooks of the skeleton work (with add-ons registered here, for the test only)."""

from __future__ import annotations

import ast
import inspect
import math

import pytest
import torch
from torch import Tensor, nn

import pgolf.model.gpt as gpt_module
from pgolf.config import Config, ConfigError, OptimConfig, config_from_dict
from pgolf.config.checks import validate
from pgolf.model.attention import CausalSelfAttention
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT, model_config_problems
from pgolf.model.layers import CastedLinear
from pgolf.model.layout import block_schedule, layout_name
from pgolf.model.registry import ATTENTIONS, EMBEDDING_ADDONS, SLOTS, STREAM_ADDONS, Registry
from pgolf.model.roles import Role, component_of, export_passthrough, param_roles, tag
from pgolf.train.optim import build_optimizers

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")
TINY = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2)
# The keys an entry needs besides its own name to be switched on.
ENABLE = {
    ("layout", "recurrence"): dict(recurrence=2),
    ("layout", "middle_cycle"): dict(num_layers=3, cycle_stem=1, cycle_core=1, cycle_repeats=2, cycle_tail=1),
    ("layout", "loop"): dict(loop_start=1, loop_end=1, loop_passes=2),
}
ENTRIES = [(field, name) for field, slot in SLOTS.items() for name in slot]


def config_enabling(field: str, name: str, **more) -> ModelConfig:
    value = [name] if SLOTS[field].many else name
    return ModelConfig(**{**TINY, field: value, **ENABLE.get((field, name), {}), **more})


def ids(seed: int, shape=(2, 16)) -> Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# Every registered entry
# ----------------------------------------------------------------------------------------

def test_the_builtin_entries():
    assert set(ATTENTIONS) == {"gqa"} and set(SLOTS["position"]) == {"rope"}
    assert set(SLOTS["layout"]) == {"unet", "recurrence", "middle_cycle", "loop"}
    assert set(SLOTS["mlp"]) == {"relu2", "leaky_relu2", "gelu", "silu", "swiglu"}
    assert (set(SLOTS["embed"]), set(SLOTS["post_norm"]), set(SLOTS["stream"])) == \
        ({"bigram", "smear_bos"}, {"smear"}, {"value_embed"})
    defaults = ModelConfig()
    assert (defaults.attention, defaults.position, defaults.embed, defaults.post_norm, defaults.stream,
            defaults.layout) == ("gqa", "rope", [], [], [], "auto")


@pytest.mark.parametrize("field, name", ENTRIES, ids=[f"{f}={n}" for f, n in ENTRIES])
def test_every_entry_builds_and_trains(field, name):
    cfg = config_enabling(field, name)
    assert model_config_problems(cfg) == []
    torch.manual_seed(0)
    model = GPT(cfg)
    roles = param_roles(model)  # every parameter has a role
    opts = build_optimizers(model, OptimConfig(), CPU)  # and exactly one optimizer group
    x, y = ids(1), ids(2)
    loss = model(x, y)
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(64)) < 0.1
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    opts.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert set(roles) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("field", list(SLOTS))
def test_unknown_names_are_refused_with_the_options(field):
    cfg = Config()
    setattr(cfg.model, field, ["nope"] if SLOTS[field].many else "nope")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    options = ", ".join([*SLOTS[field], *(["auto"] if SLOTS[field].auto else [])]) or "none registered"
    assert f"model.{field}" in str(err.value) and "'nope'" in str(err.value) and options in str(err.value)


def test_list_slots_need_a_list_of_distinct_names():
    assert model_config_problems(ModelConfig(embed="x")) == \
        ["model.embed must be a list of names, e.g. model.embed=[] (options: bigram, smear_bos)"]


def test_saved_configs_without_the_slot_keys_load_as_the_baseline():
    old = {k: v for k, v in Config().to_dict()["model"].items()
           if k not in ("attention", "position", "embed", "post_norm", "stream", "layout")}
    cfg = config_from_dict({"model": old})
    assert cfg.model == ModelConfig()
    assert config_from_dict({"model": {"embed": [], "layout": "unet"}}).model.layout == "unet"


def test_registration_is_static():
    """The bundler follows import statements: each module holding entries is imported at module
    level by pgolf.model.gpt (a computed import would ship a train_gpt.py without it)."""
    tree = ast.parse(inspect.getsource(gpt_module))
    imported = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    for field, slot in SLOTS.items():
        for name, builder in slot.items():
            assert builder.__module__ in imported, (field, name, builder.__module__)


def test_a_name_registers_once():
    slot = Registry("demo", "model.demo", None)
    slot.register("a")(lambda cfg: None)
    with pytest.raises(ValueError, match="demo 'a' is registered twice"):
        slot.register("a")(lambda cfg: None)
    with pytest.raises(ValueError, match="model.demo must be one of a, got 'b'"):
        slot.build("b")


# ----------------------------------------------------------------------------------------
# Layouts by name equal the layouts the older keys describe
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, name", [
    (dict(), "unet"), (dict(recurrence=3), "recurrence"),
    (dict(num_layers=5, cycle_stem=1, cycle_core=3, cycle_repeats=2, cycle_tail=1), "middle_cycle"),
])
def test_layout_auto_follows_the_older_keys(keys, name):
    auto = ModelConfig(**{**TINY, **keys})
    named = ModelConfig(**{**TINY, **keys, "layout": name})
    assert layout_name(auto) == name and block_schedule(auto) == block_schedule(named)
    assert model_config_problems(named) == []


@pytest.mark.parametrize("keys, message", [
    (dict(layout="unet", recurrence=2), "model.layout=unet runs every block once"),
    (dict(layout="recurrence", cycle_stem=1, cycle_core=2, cycle_repeats=2, cycle_tail=1),
     "model.layout=recurrence ignores the middle cycle"),
    (dict(layout="middle_cycle"), "the middle cycle needs model.cycle_core >= 1"),
])
def test_a_named_layout_that_contradicts_the_keys_is_refused(keys, message):
    assert any(message in p for p in model_config_problems(ModelConfig(**{**TINY, **keys})))


# ----------------------------------------------------------------------------------------
# The skeleton's add-on hooks, with entries registered for these tests only
# ----------------------------------------------------------------------------------------

class HashedBigram(nn.Module):
    """An embedding add-on: adds a projected table of (previous token, token) buckets."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.table = nn.Embedding(97, cfg.model_dim)
        tag(self.table, Role.EMBEDDING, "weight")
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim)

    def forward(self, x: Tensor, input_ids: Tensor) -> Tensor:
        prev = torch.cat((torch.zeros_like(input_ids[:, :1]), input_ids[:, :-1]), dim=1)
        return x + self.proj(self.table((prev * 31 + input_ids) % 97))


class StreamProbe(nn.Module):
    """A stream add-on: one gated copy of x0 handed to every attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Parameter(torch.full((cfg.model_dim,), 0.5))
        tag(self, Role.GATE, "gate")

    def forward(self, input_ids: Tensor, x0: Tensor) -> dict[str, Tensor]:
        return {"probe": self.gate * x0}


class ProbeAttention(CausalSelfAttention):
    """gqa, plus whatever the stream add-on handed over."""

    def forward(self, x: Tensor, extras: dict[str, Tensor] | None = None) -> Tensor:
        y = super().forward(x, extras)
        return y + extras["probe"] if extras and "probe" in extras else y


@pytest.fixture
def test_entries():
    added = [(EMBEDDING_ADDONS, "hashed_bigram", HashedBigram), (STREAM_ADDONS, "probe", StreamProbe),
             (ATTENTIONS, "probe_gqa", ProbeAttention)]
    for slot, name, builder in added:
        slot.register(name)(builder)
    yield
    for slot, name, _ in added:
        del slot[name]


def test_addons_are_off_by_default_and_built_last(test_entries):
    torch.manual_seed(3)
    base = GPT(ModelConfig(**TINY))
    torch.manual_seed(3)
    on = GPT(ModelConfig(**TINY, embed=["hashed_bigram"], stream=["probe"], attention="probe_gqa"))
    base_state, on_state = base.state_dict(), on.state_dict()
    # Built last: every weight the baseline has starts exactly as in the baseline.
    assert all(torch.equal(base_state[k], on_state[k]) for k in base_state)
    assert set(on_state) - set(base_state) == {"embed_addons.0.table.weight", "embed_addons.0.proj.weight",
                                               "stream_addons.0.gate"}
    x = ids(4)
    with torch.no_grad():
        assert not torch.allclose(base.logits(x), on.logits(x))


def test_addon_roles_components_and_groups(test_entries):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, embed=["hashed_bigram"], stream=["probe"], attention="probe_gqa"))
    roles = param_roles(model)
    assert roles["embed_addons.0.table.weight"] is Role.EMBEDDING
    assert roles["embed_addons.0.proj.weight"] is Role.MATRIX
    assert roles["stream_addons.0.gate"] is Role.GATE
    assert component_of(model, "embed_addons.0.proj.weight") == "embedding"  # its slot's component
    assert component_of(model, "blocks.0.attn.c_q.weight") == "attention"
    assert export_passthrough(model)["stream_addons.0.gate"] == "fp16"
    opts = build_optimizers(model, OptimConfig(), CPU)
    scalar_ids = {id(p) for g in opts.adam_scalar.param_groups for p in g["params"]}
    assert id(model.stream_addons[0].gate) in scalar_ids
    # The blocks' parameters keep their place at the head of each group (checkpoint order).
    assert opts.muon.param_groups[0]["params"][0] is model.blocks[0].attn.c_q.weight
    assert opts.muon.param_groups[0]["params"][-1] is model.embed_addons[0].proj.weight
    x, y = ids(5), ids(6)
    model(x, y).backward()
    assert model.stream_addons[0].gate.grad.abs().sum() > 0  # the extras reached the attention
    assert model.embed_addons[0].table.weight.grad.abs().sum() > 0


def test_addon_names_are_validated(test_entries):
    assert model_config_problems(ModelConfig(embed=["hashed_bigram", "hashed_bigram"])) == \
        ["model.embed lists 'hashed_bigram' twice"]
    assert model_config_problems(ModelConfig(stream=["nope"])) == \
        ["model.stream: unknown stream addon 'nope' (options: value_embed, probe)"]
