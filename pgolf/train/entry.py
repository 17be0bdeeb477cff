"""The root of a shipped train_gpt.py: its main, and the table of modules it carries only when
the run's config needs them.

The bundler (pgolf.train.bundle) packs the modules this one imports at module level, their
module-level imports in turn, and the OPTIONAL_MODULES whose predicate holds for the config.
Keep this module small and torch-free: it is shipped in every bundle and imported by the
bundler.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from typing import Any, Callable, Mapping

from pgolf.config import Config, ConfigError, apply_env, apply_overrides, config_from_dict, validate

BUNDLE_NAME = "train_gpt.py"
# `pgolf train`'s exit statuses (pgolf.cli.STATUS_EXIT_CODES; the cli is not bundled).
BUNDLE_EXIT_CODES = {"done": 0, "over_cap": 3, "interrupted": 130}

# Every module that pgolf imports only inside functions, with the configs that need it: it is
# bundled when its predicate holds for the run's config. A lazy import of a module that is
# neither here nor imported at module level wherever its importer is (bundle.ROOT_MODULES) is
# bundled always, and tests/train/test_bundle.py fails until it is classified here.
OPTIONAL_MODULES: dict[str, Callable[[Config], bool]] = {
    "pgolf.data.synthetic": lambda cfg: cfg.data.source == "synthetic",
    "pgolf.compress.gptq": lambda cfg: cfg.export.gptq or cfg.export.allocate,  # allocation needs its Hessians
    "pgolf.compress.allocate": lambda cfg: cfg.export.allocate,
    "pgolf.train.losses": lambda cfg: cfg.train.fused_loss != "off",  # auto: on for CUDA
    "pgolf.train.bundle": lambda cfg: False,  # packing; inside a bundle the running file is what counts
}


def describe_code(bundle: bytes, where: str) -> str:
    """How code bytes were counted; submit reads the sha256 back to check the code is unchanged."""
    return f"{where}; sha256:{hashlib.sha256(bundle).hexdigest()[:16]}"


def missing_modules(cfg: Config) -> list[str]:
    """The optional modules cfg needs that cannot be imported (in a bundle: were not packed)."""
    return [name for name, needed in OPTIONAL_MODULES.items() if needed(cfg) and importlib.util.find_spec(name) is None]


def bundled_module_check() -> str:
    """Name any pgolf module that was not served by the bundle's importer (it must not happen)."""
    import pgolf

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
    from pgolf.train.run import run_training

    summary = run_training(cfg, preset=BUNDLE_NAME, env_applied=applied)
    check = bundled_module_check()
    if is_main:
        print(check)
    return BUNDLE_EXIT_CODES.get(summary.get("status"), 1)
