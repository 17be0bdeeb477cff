"""The root of a shipped train_gpt.py: its main, which resolves the config as `pgolf train` does
and runs the same training.

The bundler (pgolf.train.bundle) packs the modules this one imports at module level, their
module-level imports in turn, and the optional modules (pgolf.train.shipping) the config needs.
Torch-free at import: training is imported when the main runs.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

import pgolf
from pgolf.config import Config, ConfigError, apply_env, apply_overrides, config_from_dict
from pgolf.rules import EXIT_USAGE, STATUS_EXIT_CODES
from pgolf.train.shipping import BUNDLE_NAME, RUNNER_KEYS

# `pgolf train`'s exit statuses: a bundle exits as the command would.
BUNDLE_EXIT_CODES = STATUS_EXIT_CODES


def bundled_module_check() -> str:
    """Name any pgolf module that was not served by the bundle's importer (it must not happen)."""
    bundle_loader = pgolf.__spec__.loader
    foreign = sorted(name for name, module in list(sys.modules.items())
                     if (name == "pgolf" or name.startswith("pgolf.")) and module is not None
                     and getattr(module.__spec__, "loader", None) is not bundle_loader)
    if foreign:
        raise ImportError(f"pgolf modules loaded from outside the bundle: {', '.join(foreign)}")
    n = sum(1 for name in sys.modules if name == "pgolf" or name.startswith("pgolf."))
    return f"bundle: all {n} pgolf modules used were loaded from {pgolf.__bundle_file__}"


def recipe_changes(packed: Config, cfg: Config) -> list[str]:
    """The keys, outside RUNNER_KEYS, where cfg differs from the recipe a bundle was packed with."""
    ours, theirs = packed.to_dict(), cfg.to_dict()
    return [f"{section}.{key}={value}" for section, values in theirs.items() for key, value in values.items()
            if value != ours[section][key] and f"{section}.{key}" not in RUNNER_KEYS]


def _refuse(problem: Exception, is_main: bool) -> int:
    if is_main:
        print(f"{BUNDLE_NAME}: error: {problem}", file=sys.stderr)
    return EXIT_USAGE


def run_bundled(config_diff: Mapping[str, Any], argv: list[str]) -> int:
    """The bundle's main: apply the runner's seed, run name and data paths to the packed recipe
    as `pgolf train` would, then train, export, score."""
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        cfg = config_from_dict(config_diff)
        applied = apply_env(cfg, os.environ)
        apply_overrides(cfg, argv)
        changed = recipe_changes(config_from_dict(config_diff), cfg)
        if changed:
            raise ConfigError(
                f"{' '.join(changed)} would change the recipe this {BUNDLE_NAME} was packed and counted for; it "
                f"sets only {', '.join(RUNNER_KEYS)}. Train a changed recipe with `pgolf train CONFIG key=value` "
                "and ship it with `pgolf submit`")
    except ConfigError as exc:
        return _refuse(exc, is_main)
    # After the config checks (a bad argument fails before torch loads), before training: the
    # artifact's compressor must be importable on this machine, not only where it was packed.
    from pgolf.compress.container import ArtifactError, check_compressor
    from pgolf.train.run import run_new

    try:
        if cfg.export.compressor != "auto":
            check_compressor(cfg.export.compressor)
    except ArtifactError as exc:
        return _refuse(exc, is_main)

    summary = run_new(cfg, BUNDLE_NAME, applied)
    check = bundled_module_check()
    if is_main:
        print(check)
    return BUNDLE_EXIT_CODES.get(summary.get("status"), 1)
