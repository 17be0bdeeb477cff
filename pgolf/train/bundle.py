"""The single-file `train_gpt.py` a submission ships: the pgolf modules a run needs, lzma +
base85 packed, a loader that serves them, and the run's config.

Its length is the counted code bytes (pgolf.compress.accounting asks `code_bytes_for`), so the number a
run reports at export is the length of the file `pgolf submit` writes for it.

Inside the file: ``CONFIG`` (the config's difference from pgolf's defaults, which are the
official baseline), then the packed modules, then an importer placed first on
``sys.meta_path`` so an installed pgolf never shadows them. Running it resolves the config as
`pgolf train` does (official environment variables such as DATA_PATH, SEED, RUN_ID, then
``section.key=value`` arguments) and calls the same training function; under torchrun each
rank does so.
"""

from __future__ import annotations

import ast
import base64
import functools
import hashlib
import lzma
import os
import pprint
import sys
from pathlib import Path
from typing import Any, Mapping

from pgolf.config import Config, ConfigError, apply_env, apply_overrides, config_from_dict, validate

PACKAGE_DIR = Path(__file__).resolve().parents[1]
ENTRY_MODULE = "pgolf.train.bundle"  # the import closure of this module is what a bundle carries
BUNDLE_NAME = "train_gpt.py"
# Keys that identify one run rather than the recipe: the seed (SEED picks it), where runs are
# written and how they are named or grouped. They take their defaults in a bundle, so every
# seed of a group ships the identical file.
RUN_IDENTITY_KEYS = (("train", "seed"), ("run", "run_id"), ("run", "runs_dir"), ("run", "group"))
# `pgolf train`'s exit statuses (pgolf.cli.STATUS_EXIT_CODES; the cli is not bundled).
BUNDLE_EXIT_CODES = {"done": 0, "over_cap": 3, "interrupted": 130}
MODULE_SEPARATOR = "\0"  # never occurs in source text

LOADER = '''\
import base64, importlib.abc, importlib.util, lzma, os, sys

HERE = os.path.abspath(__file__)
_parts = lzma.decompress(base64.b85decode(PACKED)).decode().split("\\0")
SOURCES = dict(zip(_parts[::2], _parts[1::2]))  # module name -> source
PACKAGES = {name.rpartition(".")[0] for name in SOURCES}


class BundleImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the packed pgolf modules; first on sys.meta_path, so an installed pgolf never shadows them."""

    def find_spec(self, name, path=None, target=None):
        if name not in SOURCES:
            return None
        package = name in PACKAGES
        origin = os.path.join(HERE, *name.split("."), "__init__.py") if package else \\
            os.path.join(HERE, *name.split(".")) + ".py"
        return importlib.util.spec_from_file_location(name, origin, loader=self,
                                                      submodule_search_locations=[] if package else None)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if module.__name__ == "pgolf":
            module.__bundle_file__ = HERE  # code bytes are this file's length
        exec(compile(SOURCES[module.__name__], module.__file__, "exec"), module.__dict__)

    def get_source(self, name):  # source lines in tracebacks
        return SOURCES[name]


sys.meta_path.insert(0, BundleImporter())
if __name__ == "__main__":
    from pgolf.train.bundle import run_bundled

    sys.exit(run_bundled(CONFIG, sys.argv[1:]))
'''


# --- which modules ---------------------------------------------------------------------------
def _imported_pgolf_modules(source: str, module: str) -> set[str]:
    """Every pgolf module `module` imports anywhere (top level or inside functions)."""
    package = module if module == "pgolf" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .quant import x`, `from . import quant`
                base = package + (f".{base}" if base else "")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pgolf import quant`
    return {name for name in found if name == "pgolf" or name.startswith("pgolf.")}


def _module_path(name: str) -> Path | None:
    base = PACKAGE_DIR.joinpath(*name.split(".")[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def bundle_modules() -> dict[str, str]:
    """Source of every pgolf module reachable by imports from this module, by module name
    (sorted). Imports are read from the source, so lazy imports inside functions count too."""
    sources: dict[str, str] = {}
    pending = ["pgolf", ENTRY_MODULE]
    while pending:
        name = pending.pop()
        path = _module_path(name)
        if name in sources or path is None:  # `from pgolf.x import name` also yields pgolf.x.name
            continue
        stat = path.stat()
        sources[name], imports = _read_module(str(path), name, stat.st_mtime_ns, stat.st_size)
        pending.extend(imports)
        pending.extend(name.rsplit(".", i)[0] for i in range(1, name.count(".")))  # parent packages
    return dict(sorted(sources.items()))


@functools.lru_cache(maxsize=256)
def _read_module(path: str, name: str, mtime_ns: int, size: int) -> tuple[str, frozenset[str]]:
    """(source, pgolf imports) of a file, parsed again only when it changes (every export asks)."""
    source = Path(path).read_text(encoding="utf-8")
    return source, frozenset(_imported_pgolf_modules(source, name))


# --- which config ----------------------------------------------------------------------------
def bundle_config(cfg: Config | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The recipe of a run: its resolved config without the run's identity (RUN_IDENTITY_KEYS),
    as its difference from pgolf's defaults (the official baseline); a nested mapping."""
    resolved = cfg.to_dict() if isinstance(cfg, Config) else config_from_dict(cfg).to_dict()
    defaults = Config().to_dict()
    for section, key in RUN_IDENTITY_KEYS:
        resolved[section][key] = defaults[section][key]
    diff: dict[str, dict[str, Any]] = {}
    for section, values in resolved.items():
        changed = {k: v for k, v in values.items() if v != defaults[section][k]}
        if changed:
            diff[section] = changed
    return diff


# --- the file --------------------------------------------------------------------------------
def pack_modules(sources: Mapping[str, str]) -> bytes:
    """lzma + base85 of the modules as name, source, name, source ... (the .lzma container's
    13-byte header instead of .xz's ~60; preset 9 is smaller on source text than 9 | extreme)."""
    return _pack_text(MODULE_SEPARATOR.join(part for item in sources.items() for part in item))


@functools.lru_cache(maxsize=4)
def _pack_text(text: str) -> bytes:
    return base64.b85encode(lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_ALONE, preset=9))


def build_bundle(cfg: Config | Mapping[str, Any], sources: Mapping[str, str] | None = None) -> bytes:
    """The bytes of train_gpt.py for cfg's recipe (bundle_config). Same inputs, same bytes."""
    sources = bundle_modules() if sources is None else sources
    from pgolf import __version__

    header = (f'"""train_gpt.py: a pgolf {__version__} run in one file ({len(sources)} pgolf modules packed below).\n\n'
              "Run: python train_gpt.py, or torchrun --standalone --nproc_per_node=8 train_gpt.py\n"
              "The official environment variables (DATA_PATH, TOKENIZER_PATH, SEED, RUN_ID, ITERATIONS, ...) and\n"
              "section.key=value arguments override CONFIG, as with `pgolf train`.\n"
              'Needs torch, numpy and sentencepiece.\n"""\n')
    config = "# The config's difference from pgolf's defaults (the official baseline).\n" \
             f"CONFIG = {pprint.pformat(bundle_config(cfg), width=110, sort_dicts=False)}\n"
    packed = b'PACKED = b"' + pack_modules(sources) + b'"\n'
    return header.encode() + config.encode() + packed + LOADER.encode()


def describe_code(bundle: bytes, where: str) -> str:
    """How code bytes were counted; submit reads the sha256 back to check the code is unchanged."""
    return f"{where}; sha256:{hashlib.sha256(bundle).hexdigest()[:16]}"


def code_bytes_for(cfg: Config | Mapping[str, Any]) -> tuple[int, str]:
    """(counted code bytes, description) for a run of cfg: the length of its train_gpt.py.

    Inside a running bundle that is the bundle file itself; otherwise the file `pgolf submit`
    would write for cfg."""
    import pgolf

    running = getattr(pgolf, "__bundle_file__", None)
    if running:
        data = Path(running).read_bytes()
        return len(data), describe_code(data, f"the length of this file, {Path(running).name}")
    sources = bundle_modules()
    data = build_bundle(cfg, sources)
    return len(data), describe_code(data, f"the length of {BUNDLE_NAME} as `pgolf submit` writes it: "
                                          f"{len(sources)} pgolf modules lzma + base85 packed, and the config")


# --- running inside the bundle ---------------------------------------------------------------
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
