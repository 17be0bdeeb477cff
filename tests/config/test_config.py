import tomllib

import pytest

from pgolf.config import OFFICIAL_ENV_VARS, Config, ConfigError, config_from_dict, flat_keys
from pgolf.config.resolve import REPO_CONFIG_DIR, resolve_config


def test_defaults_are_the_official_baseline():
    cfg = Config()
    m, t, o = cfg.model, cfg.train, cfg.optim
    assert (m.vocab_size, m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_mult) == (1024, 9, 512, 8, 4, 2)
    assert (m.tie_embeddings, m.tied_embed_init_std, m.logit_softcap, m.rope_base, m.qk_gain_init) == (True, 0.005, 30.0, 10000.0, 1.5)
    assert (t.iterations, t.warmdown_iters, t.warmup_steps, t.train_batch_tokens, t.train_seq_len) == (20000, 1200, 20, 524288, 1024)
    assert (t.max_wallclock_seconds, t.val_batch_size, t.val_loss_every, t.seed) == (600.0, 524288, 1000, 1337)
    assert (o.embed_lr, o.head_lr, o.tied_embed_lr, o.matrix_lr, o.scalar_lr) == (0.6, 0.008, 0.05, 0.04, 0.04)
    assert (o.muon_momentum, o.muon_backend_steps, o.muon_momentum_warmup_start, o.muon_momentum_warmup_steps) == (0.95, 5, 0.85, 500)
    assert (o.beta1, o.beta2, o.adam_eps) == (0.9, 0.95, 1e-8)


def test_baseline_preset_equals_defaults_except_name():
    cfg, _ = resolve_config("baseline", env={})
    expected = Config()
    expected.run.name = "baseline"
    assert cfg.to_dict() == expected.to_dict()


def test_every_preset_loads():
    for path in REPO_CONFIG_DIR.glob("*.toml"):
        resolve_config(str(path), env={})


def test_overrides_are_typed():
    cfg, _ = resolve_config(None, ["model.num_layers=11", "train.max_wallclock_seconds=0",
                                   "model.tie_embeddings=false", "train.train_batch_tokens=65_536"], env={})
    assert cfg.model.num_layers == 11 and isinstance(cfg.model.num_layers, int)
    assert cfg.train.max_wallclock_seconds == 0.0
    assert cfg.model.tie_embeddings is False
    assert cfg.train.train_batch_tokens == 65536


@pytest.mark.parametrize("override, hint", [
    ("model.num_layer=3", "did you mean 'num_layers'"),
    ("modle.num_layers=3", "did you mean 'model'"),
    ("num_layers=3", "section.key"),
    ("model.num_layers", "section.key=value"),
    ("model.num_layers=three", "cannot read 'three' as int"),
    ("model.num_layers=2.5", "as int"),
])
def test_bad_overrides_are_explained(override, hint):
    with pytest.raises(ConfigError, match=hint):
        resolve_config(None, [override], env={})


def test_official_env_vars_apply_with_the_official_meaning():
    env = {"NUM_LAYERS": "7", "MODEL_DIM": "384", "TIE_EMBEDDINGS": "0", "MAX_WALLCLOCK_SECONDS": "0",
           "DATA_PATH": "/x", "SEED": "42", "UNRELATED": "1"}
    cfg, applied = resolve_config(None, ["model.num_layers=5"], env=env)
    assert cfg.model.num_layers == 5  # command line beats env
    assert cfg.model.model_dim == 384 and cfg.model.tie_embeddings is False
    assert cfg.train.max_wallclock_seconds == 0 and cfg.data.data_path == "/x" and cfg.train.seed == 42
    assert "NUM_LAYERS=7" in applied and not any(a.startswith("UNRELATED") for a in applied)


def test_env_var_table_points_at_real_keys():
    keys = set(flat_keys())
    assert set(OFFICIAL_ENV_VARS.values()) <= keys


def test_unknown_preset_key_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nnum_layerz = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml.*did you mean 'num_layers'"):
        resolve_config(str(bad), env={})


def test_missing_preset_lists_available():
    with pytest.raises(ConfigError, match="available presets: .*baseline"):
        resolve_config("no_such_preset", env={})


def test_invalid_combinations_rejected():
    with pytest.raises(ConfigError, match="divisible by model.num_kv_heads"):
        resolve_config(None, ["model.num_kv_heads=3"], env={})
    with pytest.raises(ConfigError, match="multiple of 8 x train.train_seq_len"):
        resolve_config(None, ["train.train_batch_tokens=1000"], env={})


def test_saved_config_round_trip():
    cfg, _ = resolve_config("smoke", ["model.num_layers=3"], env={})
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_presets_are_valid_toml():
    for path in REPO_CONFIG_DIR.glob("*.toml"):
        tomllib.loads(path.read_text())
