"""Run configuration: the Config of every section, setting keys from overrides, official env
vars and saved configs, and validation: what a shipped train_gpt.py needs to apply its own
config. Presets and the resolution order are in pgolf.config.resolve.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pgolf.compress.config import GPTQ_CALIBRATION, ExportConfig
from pgolf.config.ranges import NUMERIC_RULES, Range, export_switch_problems, per_group_problems, range_problems
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


def numeric_values(config: Config) -> dict[str, Any]:
    """section.key -> value of every int and float key (declared type; bools are not numbers)."""
    return {f"{s.name}.{k.name}": getattr(getattr(config, s.name), k.name)
            for s in dataclasses.fields(config) for k in dataclasses.fields(getattr(config, s.name))
            if str(k.type) in ("int", "float")}


def range_check(config: Config) -> list[str]:
    """Every numeric key against its range (pgolf.config.ranges); a float key without a rule
    still refuses NaN and infinities."""
    values = numeric_values(config)
    unruled = {key: value for key, value in values.items() if key not in NUMERIC_RULES}
    return range_problems(values, NUMERIC_RULES) + range_problems(unruled, {key: Range() for key in unruled})


def validate(config: Config) -> None:
    m, t = config.model, config.train
    # Ranges first: the checks below relate keys and assume each one is a sane number.
    problems = range_check(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    if m.model_dim % m.num_heads:
        problems.append(f"model.model_dim={m.model_dim} must be divisible by model.num_heads={m.num_heads}")
    elif (m.model_dim // m.num_heads) % 2:
        problems.append("model.model_dim / model.num_heads (the head size) must be even for rotary embeddings")
    if m.num_heads % m.num_kv_heads:
        problems.append(f"model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads}")
    if t.train_batch_tokens % (8 * t.train_seq_len):
        problems.append(
            f"train.train_batch_tokens={t.train_batch_tokens} must be a multiple of 8 x train.train_seq_len"
            f"={8 * t.train_seq_len} (it is split over 8 micro-batches: world size x gradient accumulation)"
        )
    if t.val_batch_size // 8 < t.train_seq_len:
        problems.append(
            f"train.val_batch_size={t.val_batch_size} must give every one of the 8 micro-batches at least one "
            f"sequence: set it to at least 8 x train.train_seq_len = {8 * t.train_seq_len}"
        )
    if not 0 <= t.eval_stride <= t.train_seq_len:
        problems.append(f"train.eval_stride must be within 0..train.train_seq_len={t.train_seq_len} "
                        f"(0: the standard evaluation), got {t.eval_stride}")
    if config.data.source not in ("shards", "synthetic"):
        problems.append(f"data.source must be 'shards' or 'synthetic', got '{config.data.source}'")
    elif config.data.source == "synthetic" and config.data.tokenizer_path not in ("byte260", "byte"):
        problems.append(
            f"data.source=synthetic is a byte-level corpus and needs data.tokenizer_path=byte260, not "
            f"'{config.data.tokenizer_path}'; for shards made with that tokenizer set data.source=shards"
        )
    # Imported here, not at the top: pgolf.config stays cheap and torch-free to import (pgolf config,
    # pgolf submit); checking a config asks the stages that own the choices.
    from pgolf.compress.container import COMPRESSOR_CHOICES, ArtifactError, check_compressor

    if config.export.compressor not in COMPRESSOR_CHOICES:
        problems.append(f"export.compressor must be one of {', '.join(COMPRESSOR_CHOICES)}, "
                        f"got '{config.export.compressor}'")
    elif config.export.compressor != "auto":
        try:
            check_compressor(config.export.compressor)
        except ArtifactError as exc:
            problems.append(str(exc))
    e = config.export
    from pgolf.compress.quant import CLIP_RULES, CONTROLS, SCHEMES, policy_bits

    if e.scheme not in SCHEMES:
        problems.append(f"export.scheme must be one of {', '.join(SCHEMES)}, got '{e.scheme}'")
    try:
        policy_bits(e.policy)
    except ValueError as exc:
        problems.append(f"export.policy: {exc}")
    for key, options in (("clip_search", ("auto", "on", "off")), ("storage", ("auto", "packed", "bytes")),
                         ("layout", ("auto", "plain", "grouped", "per_group")), ("clip_rule", CLIP_RULES),
                         ("controls", CONTROLS),
                         ("gptq_calibration", GPTQ_CALIBRATION)):
        if getattr(e, key) not in options:
            problems.append(f"export.{key} must be one of {', '.join(options)}, got '{getattr(e, key)}'")
    problems.extend(per_group_problems(e))
    problems.extend(export_switch_problems(config))
    if e.gptq_reserve_seconds > 0 and not (e.gptq or e.allocate):
        problems.append("export.gptq_reserve_seconds reserves time for the calibration of GPTQ or the allocator: "
                        "set export.gptq=true (or export.allocate=true) too")
    if e.gptq_reserve_seconds >= max(t.max_wallclock_seconds, 0) > 0:
        problems.append("export.gptq_reserve_seconds must be smaller than train.max_wallclock_seconds")
    q = config.qat
    if q.mode not in ("ste", "noise"):
        problems.append(f"qat.mode must be 'ste' or 'noise', got '{q.mode}'")
    from pgolf.model.gpt import model_config_problems

    problems.extend(model_config_problems(m))
    if t.device not in ("auto", "cpu", "cuda"):
        problems.append("train.device must be auto, cpu or cuda")
    if t.compile not in ("auto", "on", "off"):
        problems.append("train.compile must be auto, on or off")
    switches = (("train.fused_loss", t.fused_loss), ("optim.batched_ns", config.optim.batched_ns),
                ("optim.parallel_muon", config.optim.parallel_muon), ("data.prefetch", config.data.prefetch),
                ("data.byte_sidecar", config.data.byte_sidecar))
    problems += [f"{key} must be auto, on or off, got '{value}'" for key, value in switches
                 if value not in ("auto", "on", "off")]
    if config.data.packed_row and not m.doc_mask:
        problems.append("data.packed_row=true makes each micro-batch one row; without model.doc_mask its attention "
                        "would span the whole micro-batch: set model.doc_mask=true (and model.max_span)")
    if config.data.caseops and config.data.byte_sidecar == "off":
        problems.append("data.caseops=true scores the original text's bytes from the byte sidecar: "
                        "data.byte_sidecar must be auto or on")
    if t.sdpa_backend not in ("auto", "flash", "cudnn", "efficient", "math"):
        problems.append(f"train.sdpa_backend must be auto, flash, cudnn, efficient or math, got '{t.sdpa_backend}'")
    if config.optim.muon_ns not in ("classic", "polar_express"):
        problems.append(f"optim.muon_ns must be classic or polar_express, got '{config.optim.muon_ns}'")
    if t.grad_clip_mode not in ("synced", "per_rank"):
        problems.append(f"train.grad_clip_mode must be synced or per_rank, got '{t.grad_clip_mode}'")
    if config.optim.parallel_muon_bf16 and config.optim.parallel_muon == "off":
        problems.append("optim.parallel_muon_bf16=true needs optim.parallel_muon=auto or on")
    if config.ema.enabled and config.swa.enabled:
        problems.append("ema.enabled and swa.enabled both replace the weights at the end of training: switch one off")
    for section in dataclasses.fields(config):  # sections that check themselves (techniques)
        check = getattr(getattr(config, section.name), "problems", None)
        if check is not None:
            problems.extend(check())
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


