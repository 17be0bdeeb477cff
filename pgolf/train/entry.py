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
from pgolf.config import ConfigError, apply_env, apply_overrides, config_from_dict
from pgolf.config.checks import validate
from pgolf.rules import STATUS_EXIT_CODES
from pgolf.train.shipping import BUNDLE_NAME, missing_modules

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


def run_bundled(config_diff: Mapping[str, Any], argv: list[str]) -> int:
    """The bundle's main: resolve config as `pgolf train` does, train, export, score."""
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        cfg = config_from_dict(config_diff)
        applied = apply_env(cfg, os.environ)
        apply_overrides(cfg, argv)
        validate(cfg)
        missing = missing_modules(cfg)
        if missing:  # fail before training, not at the lazy import after it
            raise ConfigError(f"this {BUNDLE_NAME} was packed for a config that does not need {', '.join(missing)}; "
                              "write one for this config with `pgolf submit` (or pgolf.train.bundle.build_bundle)")
    except ConfigError as exc:
        if is_main:
            print(f"{BUNDLE_NAME}: error: {exc}", file=sys.stderr)
        return 2
    from pgolf.train.run import run_training  # after the config checks: a bad argument fails before torch loads

    summary = run_training(cfg, preset=BUNDLE_NAME, env_applied=applied)
    check = bundled_module_check()
    if is_main:
        print(check)
    return BUNDLE_EXIT_CODES.get(summary.get("status"), 1)
