"""The contract every technique keeps, checked for every registry entry: the model slots
(pgolf.model.registry: attention, position, MLP, layout, embedding and stream add-ons) and the
training callbacks (pgolf.train.callbacks: QAT, EMA, SWA). The quantizers have theirs in
tests/compress/quantizers/test_contract.py; tests/model/test_registry.py builds and trains every
model entry; tests/test_golden_baseline.py pins the defaults bit for bit.

A new entry is found here on its own. If it needs keys besides its name to be switched on, add
them to ENABLE (model slots, in tests/model/test_registry.py) or CALLBACK_ON below.
"""

from __future__ import annotations

import ast
import tempfile
import tomllib
from pathlib import Path

import pytest
import torch

from pgolf.compress.container import pack_artifact, read_artifact
from pgolf.compress.quant import dequantize_state_dict, quantize_state_dict
from pgolf.config import Config, apply_mapping, apply_overrides
from pgolf.config.checks import validate
from pgolf.config.resolve import CAPABILITIES
from pgolf.model.gpt import GPT
from pgolf.model.registry import SLOTS
from pgolf.model.roles import export_treatment, param_roles
from pgolf.runs import read_metrics
from pgolf.train.bundle import bundle_modules, shipped_sources
from pgolf.train.callbacks import CALLBACKS
from pgolf.train.optim import build_optimizers
from pgolf.train.run import run_training
from pgolf.train.trainer import build_callbacks
from tests.model.test_registry import ENABLE, TINY
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

MODEL_ENTRIES = [(field, name) for field, slot in SLOTS.items() for name in slot]
# What switches each callback on (and early enough to act in a few steps).
CALLBACK_ON = {"qat": {"qat": {"enabled": True, "start_frac": 0.0}}, "ema": {"ema": {"enabled": True, "decay": 0.5}},
               "swa": {"swa": {"enabled": True, "every": 1, "start_scale": 2.0}},
               "loop": {"model": {"layout": "loop", "loop_start": 1, "loop_end": 1, "loop_passes": 2,
                                  "loop_start_frac": 0.5}}}


def model_mapping(field: str, name: str) -> dict:
    """The [model] table switching the entry on (TOML form)."""
    value = [name] if SLOTS[field].many else name
    return {"model": {**TINY, field: value, **ENABLE.get((field, name), {})}}


def as_overrides(mapping: dict) -> list[str]:
    """The same settings on the command line."""
    out = []
    for section, values in mapping.items():
        for key, value in values.items():
            text = ",".join(value) if isinstance(value, list) else str(value).lower() if isinstance(value, bool) \
                else str(value)
            out.append(f"{section}.{key}={text}")
    return out


def toml_text(mapping: dict) -> str:
    def literal(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(f'"{x}"' for x in v) + "]"
        return f'"{v}"' if isinstance(v, str) else repr(v)

    return "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {literal(v)}" for k, v in values.items())
                     for s, values in mapping.items())


def config_both_ways(mapping: dict) -> Config:
    """Parse the settings from TOML and from the command line; both must give one config."""
    from_toml, from_cli = Config(), Config()
    apply_mapping(from_toml, tomllib.loads(toml_text(mapping)), origin="contract")
    apply_overrides(from_cli, as_overrides(mapping))
    assert from_toml == from_cli
    validate(from_toml)
    return from_toml


def definitions(source: str) -> set[str]:
    return {stmt.name for stmt in ast.parse(source).body if hasattr(stmt, "name")}


def run_overrides(mapping: dict, shape: dict | None = None) -> list[str]:
    """Command-line overrides for a tiny training run: the model shape is tiny_config's, except
    the keys the entry needs (`shape`)."""
    shape = shape or {}
    return [o for o in as_overrides(mapping) if (key := o.split("=")[0].split(".")[1]) not in TINY or key in shape]


def test_every_entry_is_checked_and_can_be_required_by_a_preset():
    assert MODEL_ENTRIES and set(CALLBACK_ON) == set(CALLBACKS)
    assert {name for _, name in MODEL_ENTRIES} | set(CALLBACKS) <= CAPABILITIES


@pytest.mark.parametrize("field, name", MODEL_ENTRIES, ids=[f"{f}={n}" for f, n in MODEL_ENTRIES])
def test_model_entry(field, name, tmp_path):
    mapping = model_mapping(field, name)
    cfg = config_both_ways(mapping)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    # Every parameter has a role and exactly one optimizer group (build_optimizers asserts it).
    assert set(param_roles(model)) == {n for n, _ in model.named_parameters()}
    build_optimizers(model, cfg.optim, torch.device("cpu"))
    # Export -> container -> dequantize -> a fresh model loads it strictly.
    qdict = read_artifact_from(pack_artifact(quantized(model), meta={}))
    GPT(cfg.model).load_state_dict(dequantize_state_dict(qdict), strict=True)
    # The module holding the entry ships in the bundle of a config that uses it, its definition
    # included; a bundle whose config chooses another entry of the slot leaves the definition out.
    builder = SLOTS[field][name]
    assert builder.__module__ in bundle_modules(cfg)
    assert builder.__name__ in definitions(shipped_sources(cfg)[builder.__module__])
    default = getattr(Config().model, field)
    if builder not in {SLOTS[field].get(n) for n in (default if SLOTS[field].many else [default])} \
            and default != "auto":
        assert builder.__name__ not in definitions(shipped_sources(Config()).get(builder.__module__, ""))
    # Checkpoints resume exactly.
    assert_resumes_exactly(tmp_path, run_overrides(mapping, ENABLE.get((field, name))))


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_callback(name, tmp_path):
    module, enabled = CALLBACKS[name]
    assert not enabled(Config()) and build_callbacks(Config()) == []  # off by default: the golden baseline
    cfg = config_both_ways(CALLBACK_ON[name])
    assert enabled(cfg) and [type(cb).__module__ for cb in build_callbacks(cfg)] == [module]
    assert module in bundle_modules(cfg) and module not in bundle_modules(Config())
    summary = assert_resumes_exactly(tmp_path, run_overrides(CALLBACK_ON[name]))
    assert summary["status"] == "done"


def quantized(model):
    return quantize_state_dict(model.state_dict(), roles=export_treatment(model))[0]


def read_artifact_from(blob: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.pgolf"
        path.write_bytes(blob)
        return read_artifact(path)[0]


def assert_resumes_exactly(tmp_path, overrides: list[str]) -> dict:
    """A run interrupted after step 3 and resumed ends where an uninterrupted one does, with
    finite losses."""
    common = ["train.iterations=5", "train.checkpoint_every=2", "train.val_loss_every=0", *overrides]
    straight = run_training(tiny_config(tmp_path, *common, "run.run_id=straight"), console=False)
    run_training(tiny_config(tmp_path, *common, "run.run_id=cut"), interrupt_at_step=3, console=False)
    resumed = run_training(tiny_config(tmp_path), resume=str(tmp_path / "runs" / "cut"), console=False)
    assert resumed["pre_quant"] == straight["pre_quant"] and resumed["roundtrip"] == straight["roundtrip"]
    losses = [e["train_loss"] for e in read_metrics(tmp_path / "runs" / "straight") if e["event"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    return straight
