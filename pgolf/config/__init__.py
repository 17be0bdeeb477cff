"""Run configuration: the Config of every section and setting keys from overrides, official env
vars and saved configs: what a shipped train_gpt.py needs to apply its own config. Checking a
config is pgolf.config.checks; presets and the resolution order are pgolf.config.resolve.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pgolf.compress.config import ExportConfig
from pgolf.data.config import DataConfig
from pgolf.model.config import ModelConfig
from pgolf.train.config import EMAConfig, OptimConfig, QATConfig, RunConfig, SWAConfig, TrainConfig


class ConfigError(ValueError):
    """A preset, override or environment variable that cannot be applied."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def train_files(self) -> str:
        return str(Path(self.data.data_path) / self.data.train_pattern)

    def val_files(self) -> str:
        return str(Path(self.data.data_path) / self.data.val_pattern)


# Official train_gpt.py environment variables -> pgolf keys (same meaning and units).
OFFICIAL_ENV_VARS: dict[str, str] = {
    "DATA_PATH": "data.data_path",
    "TOKENIZER_PATH": "data.tokenizer_path",
    "RUN_ID": "run.run_id",
    "SEED": "train.seed",
    "VAL_BATCH_SIZE": "train.val_batch_size",
    "VAL_LOSS_EVERY": "train.val_loss_every",
    "TRAIN_LOG_EVERY": "train.train_log_every",
    "ITERATIONS": "train.iterations",
    "WARMDOWN_ITERS": "train.warmdown_iters",
    "WARMUP_STEPS": "train.warmup_steps",
    "TRAIN_BATCH_TOKENS": "train.train_batch_tokens",
    "TRAIN_SEQ_LEN": "train.train_seq_len",
    "MAX_WALLCLOCK_SECONDS": "train.max_wallclock_seconds",
    "GRAD_CLIP_NORM": "train.grad_clip_norm",
    "QK_GAIN_INIT": "model.qk_gain_init",
    "VOCAB_SIZE": "model.vocab_size",
    "NUM_LAYERS": "model.num_layers",
    "NUM_KV_HEADS": "model.num_kv_heads",
    "MODEL_DIM": "model.model_dim",
    "NUM_HEADS": "model.num_heads",
    "MLP_MULT": "model.mlp_mult",
    "TIE_EMBEDDINGS": "model.tie_embeddings",
    "ROPE_BASE": "model.rope_base",
    "LOGIT_SOFTCAP": "model.logit_softcap",
    "TIED_EMBED_INIT_STD": "model.tied_embed_init_std",
    "EMBED_LR": "optim.embed_lr",
    "HEAD_LR": "optim.head_lr",
    "TIED_EMBED_LR": "optim.tied_embed_lr",
    "MATRIX_LR": "optim.matrix_lr",
    "SCALAR_LR": "optim.scalar_lr",
    "MUON_MOMENTUM": "optim.muon_momentum",
    "MUON_BACKEND_STEPS": "optim.muon_backend_steps",
    "MUON_MOMENTUM_WARMUP_START": "optim.muon_momentum_warmup_start",
    "MUON_MOMENTUM_WARMUP_STEPS": "optim.muon_momentum_warmup_steps",
    "BETA1": "optim.beta1",
    "BETA2": "optim.beta2",
    "ADAM_EPS": "optim.adam_eps",
}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _section(config: Config, section: str) -> Any:
    sections = [f.name for f in dataclasses.fields(Config)]
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}'{_suggest(section, sections)}")
    return getattr(config, section)


def _coerce(value: Any, target_type: str, key: str) -> Any:
    """Convert a TOML / string value to the field's declared type, strictly."""
    try:
        if target_type == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target_type == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        if target_type == "list":
            return _parse_list(value)
        if target_type == "list[int]":  # layer indices: model.xsa_layers=-4,-3,-2,-1 or a TOML list
            return [_coerce(item, "int", key) for item in _parse_list(value)]
        if target_type == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {target_type}") from None


def _parse_list(value: Any) -> list:
    """A TOML list as is; on the command line comma-separated items: 'pattern:value' pairs
    (export.policy) or plain names (model.embed=a,b). Each key's validation checks the form."""
    if isinstance(value, list):
        return [list(item) if isinstance(item, (list, tuple)) else item for item in value]
    items = []
    for part in filter(None, (p.strip() for p in str(value).split(","))):
        pattern, sep, spec = part.rpartition(":")
        items.append([pattern, int(spec) if spec.isdigit() else spec] if sep else part)
    return items


def set_key(config: Config, dotted_key: str, value: Any) -> None:
    """Set `section.key` on config, rejecting unknown keys with a suggestion."""
    if "." not in dotted_key:
        all_keys = [k for k in flat_keys()]
        raise ConfigError(f"config key '{dotted_key}' must look like section.key{_suggest(dotted_key, all_keys)}")
    section_name, key = dotted_key.split(".", 1)
    section = _section(config, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(f"unknown config key '{dotted_key}'{_suggest(key, list(fields))}")
    setattr(section, key, _coerce(value, str(fields[key].type), dotted_key))


def flat_keys() -> list[str]:
    return [f"{s.name}.{k.name}" for s in dataclasses.fields(Config) for k in dataclasses.fields(s.default_factory())]


def apply_mapping(config: Config, mapping: Mapping[str, Any], origin: str) -> None:
    """Apply a nested {section: {key: value}} mapping (a TOML preset or a saved config)."""
    for section_name, values in mapping.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: '{section_name}' must be a table like [{section_name}]")
        for key, value in values.items():
            try:
                set_key(config, f"{section_name}.{key}", value)
            except ConfigError as exc:
                raise ConfigError(f"{origin}: {exc}") from None


def apply_overrides(config: Config, overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. model.num_layers=11")
        key, value = item.split("=", 1)
        set_key(config, key.strip(), value.strip())


def official_env_present(env: Mapping[str, str]) -> bool:
    return any(var in env for var in OFFICIAL_ENV_VARS)


def apply_env(config: Config, env: Mapping[str, str]) -> list[str]:
    """Apply the official environment variables present in env; return those applied.

    DATA_PATH means what it means to train_gpt.py: a folder of fineweb_train_*.bin and
    fineweb_val_*.bin shards."""
    applied = []
    if "DATA_PATH" in env:
        config.data.source = "shards"
        config.data.train_pattern = DataConfig.train_pattern
        config.data.val_pattern = DataConfig.val_pattern
    for var, key in OFFICIAL_ENV_VARS.items():
        if var in env:
            try:
                set_key(config, key, env[var])
            except ConfigError as exc:
                raise ConfigError(f"environment variable {var}: {exc}") from None
            applied.append(f"{var}={env[var]}")
    return applied


def config_from_dict(data: Mapping[str, Any]) -> Config:
    config = Config()
    apply_mapping(config, data, origin="saved config")
    return config
