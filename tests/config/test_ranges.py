"""Every numeric config key has a valid range; values outside it are refused, naming key and range."""

import math

import pytest

from pgolf.cli import main as cli_main
from pgolf.config import Config, ConfigError, flat_keys
from pgolf.config.checks import numeric_values
from pgolf.config.ranges import NUMERIC_RULES, Range
from pgolf.config.resolve import resolve_config


@pytest.mark.parametrize("override, message", [
    ("train.iterations=-5", "train.iterations must be positive (>= 1), got -5"),
    ("train.iterations=0", "train.iterations must be positive (>= 1)"),
    ("optim.matrix_lr=nan", "optim.matrix_lr must be a finite number"),
    ("optim.matrix_lr=-0.01", "optim.matrix_lr must be >= 0"),
    ("optim.embed_lr=inf", "optim.embed_lr must be a finite number"),
    ("optim.beta1=1", "optim.beta1 must be within [0, 1)"),
    ("optim.beta2=-0.1", "optim.beta2 must be within [0, 1)"),
    ("optim.adam_eps=0", "optim.adam_eps must be positive (> 0)"),
    ("optim.muon_momentum=1.5", "optim.muon_momentum must be within [0, 1)"),
    ("optim.muon_backend_steps=0", "optim.muon_backend_steps must be >= 1"),
    ("optim.muon_momentum_warmup_steps=-1", "optim.muon_momentum_warmup_steps must be >= 0"),
    ("optim.muon_wd=-0.1", "optim.muon_wd must be >= 0"),
    ("model.num_heads=0", "model.num_heads must be positive"),
    ("model.logit_softcap=0", "model.logit_softcap must be positive"),
    ("model.rope_base=-inf", "model.rope_base must be a finite number"),
    ("model.mlp_slope=nan", "model.mlp_slope must be a finite number, within [0, 1]"),
    ("model.recurrence=0", "model.recurrence must be >= 1, got 0 (1: every block runs once)"),
    ("model.cycle_tail=-1", "model.cycle_tail must be >= 0"),
    ("model.tied_embed_init_std=-1", "model.tied_embed_init_std must be >= 0"),
    ("data.synthetic_train_tokens=1", "data.synthetic_train_tokens must be >= 2"),
    ("data.synthetic_seed=-3", "data.synthetic_seed must be >= 0"),
    ("train.seed=-1", "train.seed must be within 0..4294967295"),
    ("train.max_wallclock_seconds=-1", "train.max_wallclock_seconds must be >= 0"),
    ("train.max_wallclock_seconds=inf", "train.max_wallclock_seconds must be a finite number"),
    ("train.warmdown_frac=1.5", "train.warmdown_frac must be within [0, 1]"),
    ("train.val_max_tokens=-1", "train.val_max_tokens must be >= 0"),
    ("train.eval_stride=-64", "train.eval_stride must be >= 0"),
    ("train.grad_clip_norm=nan", "train.grad_clip_norm must be a finite number"),
    ("train.checkpoint_every=-2", "train.checkpoint_every must be >= 0"),
    ("qat.bits=1", "qat.bits must be within 2..8, got 1"),
    ("qat.start_frac=1", "qat.start_frac must be within [0, 1)"),
    ("ema.decay=1", "ema.decay must be within (0, 1), got 1.0"),
    ("export.gptq_seqs=0", "export.gptq_seqs must be positive (>= 1)"),
    ("export.gptq_damp=-0.01", "export.gptq_damp must be >= 0"),
    ("export.gptq_reserve_seconds=nan", "export.gptq_reserve_seconds must be a finite number"),
    ("export.allocate_budget=-1", "export.allocate_budget must be >= 0"),
])
def test_bad_numbers_are_refused_naming_the_key_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        resolve_config(None, [override], env={})
    assert message in str(err.value)


def test_every_numeric_key_has_a_range_rule():
    """A new int or float key fails here until NUMERIC_RULES says what values it takes."""
    missing = sorted(set(numeric_values(Config())) - set(NUMERIC_RULES))
    assert not missing, f"add a rule to pgolf.config.ranges.NUMERIC_RULES for: {', '.join(missing)}"


def test_every_rule_names_a_real_numeric_key():
    assert set(NUMERIC_RULES) <= set(flat_keys())
    assert set(NUMERIC_RULES) == set(numeric_values(Config()))


def test_defaults_and_boundaries_are_accepted():
    resolve_config(None, ["train.max_wallclock_seconds=0", "optim.muon_wd=0", "optim.matrix_lr=0",
                          "train.warmdown_frac=1", "qat.start_frac=0", "qat.bits=8", "train.seed=0",
                          "model.mlp_hidden=0", "train.eval_stride=0", "optim.beta1=0"], env={})


def test_a_float_key_without_a_rule_still_refuses_nan(monkeypatch):
    monkeypatch.delitem(NUMERIC_RULES, "optim.matrix_lr")
    with pytest.raises(ConfigError, match="optim.matrix_lr must be a finite number, got nan"):
        resolve_config(None, ["optim.matrix_lr=nan"], env={})


def test_range_words():
    assert Range(0.0, 1.0, low_open=True).problem("k", 0.0) == "k must be within (0, 1], got 0.0"
    assert Range(0.0, 1.0).problem("k", 0.5) is None and Range(0.0, 1.0).problem("k", 1.0) is None
    assert Range(low=1, named="positive").problem("k", math.nan) == "k must be a finite number, positive (>= 1), got nan"
    assert Range(2, 8).problem("k", 9) == "k must be within 2..8, got 9"


def test_train_refuses_a_negative_iteration_count_before_running(tmp_path, capsys):
    assert cli_main(["train", "train.iterations=-5", f"run.runs_dir={tmp_path}"]) == 2
    assert "train.iterations must be positive (>= 1), got -5" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
