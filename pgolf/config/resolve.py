"""Resolving a run's config from a preset: finding and loading the TOML presets, the
capabilities a preset may require, the order of resolution, and `--data DIR`.

Resolution order (later wins): dataclass defaults (= the official baseline) < preset TOML
< official environment variables (NUM_LAYERS=..., as `train_gpt.py` reads them) <
command-line `section.key=value` overrides. The resolved config is saved with every run, so a
shipped train_gpt.py starts from a saved config (pgolf.config.config_from_dict) and never
reads presets: this module stays out of it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pgolf.config import Config, ConfigError, apply_env, apply_mapping, apply_overrides
from pgolf.config.checks import validate

REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_PRESET = "smoke"
# With official environment variables set (an official run command), the defaults are the
# official baseline's, as in train_gpt.py, not the smoke run's.
OFFICIAL_DEFAULT_PRESET = "baseline"


def find_preset(name_or_path: str) -> Path:
    """A preset path, or a bare name looked up in ./configs and the repository's configs/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    candidates = [Path("configs") / stem, REPO_CONFIG_DIR / stem]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in REPO_CONFIG_DIR.glob("*.toml")) if REPO_CONFIG_DIR.is_dir() else []
    raise ConfigError(
        f"preset '{name_or_path}' not found (looked at {path}, {', '.join(str(c) for c in candidates)}); "
        f"available presets: {', '.join(available) or 'none'}"
    )


# What a preset may list in its top-level `requires = [...]`: the techniques this version of
# pgolf implements. A preset naming anything else is refused instead of silently run without it.
# Written out (this module stays torch-free); tests/test_technique_contract.py checks that every
# registry entry and training callback is here.
CAPABILITIES = frozenset({
    "gqa", "rope",  # model.attention, model.position
    "bigram", "smear", "value_embed",  # model.embed, model.post_norm, model.stream
    "xsa", "partial_rope", "ln_scale", "orthogonal_init",  # model.xsa_layers, rope_*, ln_scale, init
    "relu2", "leaky_relu2", "swiglu", "gelu", "silu",  # model.mlp
    "unet", "recurrence", "middle_cycle",  # model.layout (or model.recurrence, model.cycle_*)
    "loop", "skip_gates", "parallel_residual", "attn_gate", "smear_bos",  # model.layout=loop (+ its late
    # start, a training callback), model.skip_gates, model.parallel_from, model.attn_gate_dims, model.embed
    "muon_wd", "polar_express", "muon_row_norm", "min_lr",  # optim.muon_wd, muon_ns, muon_row_norm, train.min_lr
    "fp16_embedding", "mixed_bits", "gptq", "bit_allocation",  # export.*
    "per_group",  # export.layout=per_group (export.row_order, export.group_backend)
    "sdclip", "lqer", "attn_gate_int8", "gptq_embedding",  # export.clip_rule=sdclip, lqer_rank, attn_gate_int8,
    # gptq_embedding
    "qat", "ema", "swa",  # training callbacks: qat.*, ema.*, swa.*
    "sliding_eval", "ttt",  # train.eval_stride, pgolf eval --stride / --ttt
    "caseops", "byte_sidecar",  # data.caseops, data.byte_sidecar
    "doc_mask", "doc_packing", "packed_row",  # model.doc_mask (+ model.max_span), data.doc_packing, data.packed_row
})


def check_requires(requires: Any, origin: str) -> None:
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise ConfigError(f'{origin}: requires must be a list of capability names, e.g. requires = ["swiglu"]')
    for name in requires:
        if name not in CAPABILITIES:
            raise ConfigError(f"preset {origin} requires capability '{name}', which this version of pgolf does not "
                              f"have (it has: {', '.join(sorted(CAPABILITIES))})")


def load_preset(config: Config, name_or_path: str) -> Path:
    path = find_preset(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset {path} is not valid TOML: {exc}") from None
    check_requires(data.pop("requires", []), str(path))
    apply_mapping(config, data, origin=str(path))
    return path


def resolve_config(
    preset: str | None = DEFAULT_PRESET,
    overrides: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Config, list[str]]:
    """Build the run config; returns it and the official env vars that were applied."""
    env = os.environ if env is None else env
    config = Config()
    if preset:
        load_preset(config, preset)
    applied = apply_env(config, env)
    apply_overrides(config, overrides or [])
    validate(config)
    return config, applied


def data_dir_overrides(data_dir: Path, user_overrides: list[str]) -> list[str]:
    """--data DIR: official shards in DIR; its tokenizer unless data.tokenizer_path is given,
    and the vocabulary of whichever tokenizer is used unless model.vocab_size is given."""
    if not data_dir.is_dir():
        raise ConfigError(f"--data {data_dir}: not a directory")
    out = ["data.source=shards", f"data.data_path={data_dir}"]
    user_keys = {o.split("=", 1)[0].strip() for o in user_overrides}
    for key, pattern in (("data.train_pattern", "fineweb_train_*.bin"), ("data.val_pattern", "fineweb_val_*.bin")):
        if key not in user_keys:
            out.append(f"{key}={pattern}")
    given = {o.split("=", 1)[0].strip(): o.split("=", 1)[1].strip() for o in user_overrides if "=" in o}
    tokenizer = given.get("data.tokenizer_path")
    if tokenizer is None:
        models = sorted(data_dir.glob("*.model"))
        if len(models) > 1:
            raise ConfigError(f"--data {data_dir}: several tokenizers ({', '.join(m.name for m in models)}); "
                              "choose one with data.tokenizer_path=...")
        if not models:
            raise ConfigError(f"--data {data_dir}: no SentencePiece .model file in it; pass data.tokenizer_path=PATH")
        tokenizer = str(models[0])
        out.append(f"data.tokenizer_path={tokenizer}")
    if "model.vocab_size" not in user_keys and Path(tokenizer).is_file():  # else the config check names it
        from pgolf.data.tokenizer import load_tokenizer

        out.append(f"model.vocab_size={load_tokenizer(tokenizer).vocab_size}")
    return out
