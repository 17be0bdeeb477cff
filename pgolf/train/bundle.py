"""The single-file `train_gpt.py` a submission ships: the pgolf modules a run of a config needs,
minified, compressed (brotli-11, or lzma without brotli) and base85-encoded, a loader that serves
them, and the run's config.

Its length is the counted code bytes (pgolf.compress.accounting asks `code_bytes_for`), so the
number a run reports at export is the length of the file `pgolf submit` writes for it.

Which modules: the module-level imports of ROOT_MODULES, followed statically, plus the
optional modules (imported inside functions) whose predicate in shipping.OPTIONAL_MODULES holds for
the config. Inside the file: a one-line header, ``CONFIG`` (the config's difference from pgolf's
defaults, which are the official baseline), the packed modules, then an importer placed first
on ``sys.meta_path`` so an installed pgolf never shadows them; it compiles each module under its
package path (``.../train_gpt.py/pgolf/train/run.py``), so tracebacks name the original module.
Running the file resolves the config as `pgolf train` does and trains; under torchrun each rank
does so.
"""

from __future__ import annotations

import ast
import base64
import functools
import lzma
from pathlib import Path
from typing import Any, Mapping

from pgolf.config import Config, config_from_dict
from pgolf.train.shipping import BUNDLE_NAME, OPTIONAL_MODULES, RUN_IDENTITY_KEYS, describe_code
from pgolf.train.minify import minify_source
from pgolf.train.shake import registration, shake, string_constants

PACKAGE_DIR = Path(__file__).resolve().parents[1]
ENTRY_MODULE = "pgolf.train.entry"  # the bundle's main and the optional-module table
# Always bundled, with their module-level imports: the package, the main, and the training it
# runs (which the main imports lazily, so that this bundler, importing entry, stays torch-free).
ROOT_MODULES = ("pgolf", ENTRY_MODULE, "pgolf.train.run")
MODULE_SEPARATOR = "\0"  # never occurs in source text
LOADER_CALLS = ("run_bundled",)  # what the loader below calls: shake() must keep it
COMPRESSORS = ("brotli", "lzma")  # best first; brotli when it is importable at pack time

# The loader, after CONFIG and PACKED. Terse on purpose: its bytes are counted uncompressed.
# {compressor} is the module that decompresses PACKED (brotli.decompress or lzma.decompress).
LOADER = '''\
import base64,importlib.util as u,os,sys
try:import {compressor} as z
except ImportError:sys.exit("{bundle} needs {compressor}: pip install {compressor}")
F=os.path.abspath(__file__)
p=z.decompress(base64.b85decode(PACKED)).decode().split("\\0")
S=dict(zip(p[::2],p[1::2]))
class I:
 def find_spec(s,n,*a):
  if n in S:k=any(m.startswith(n+".")for m in S);return u.spec_from_file_location(n,os.path.join(F,*n.split("."))+("/__init__.py"if k else".py"),loader=s,submodule_search_locations=[]if k else None)
 def create_module(s,x):pass
 def exec_module(s,m):
  if m.__name__=="pgolf":m.__bundle_file__=F
  exec(compile(S[m.__name__],m.__file__,"exec"),m.__dict__)
 def get_source(s,n):return S[n]
sys.meta_path.insert(0,I())
if __name__=="__main__":from {entry} import run_bundled;sys.exit(run_bundled(CONFIG,sys.argv[1:]))
'''


class BundleError(RuntimeError):
    """A bundle cannot be built (unknown compressor, missing packer)."""


# --- which modules ---------------------------------------------------------------------------
def _pgolf_imports(source: str, module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(module-level, function-level) pgolf modules `module` imports. Module level includes
    class bodies and if/try blocks: they run at import."""
    package = module if module == "pgolf" else module.rsplit(".", 1)[0]
    found: tuple[set[str], set[str]] = (set(), set())

    def visit(node: ast.AST, in_function: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .quant import x`, `from . import quant`
                base = package + (f".{base}" if base else "")
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]  # `from pgolf import quant`
        found[in_function].update(n for n in names if n == "pgolf" or n.startswith("pgolf."))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), False)
    return frozenset(found[0]), frozenset(found[1])


def _imported_pgolf_modules(source: str, module: str) -> set[str]:
    """Every pgolf module `module` imports, at module level or inside functions."""
    return set().union(*_pgolf_imports(source, module))


def _module_path(name: str) -> Path | None:
    base = PACKAGE_DIR.joinpath(*name.split(".")[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=256)
def _read_module(path: str, name: str, mtime_ns: int, size: int) -> tuple[str, frozenset[str], frozenset[str]]:
    """(source, module-level and function-level pgolf imports) of a file, parsed again only when
    it changes (every export asks)."""
    source = Path(path).read_text(encoding="utf-8")
    return (source, *_pgolf_imports(source, name))


def _read(name: str) -> tuple[str, frozenset[str], frozenset[str]] | None:
    path = _module_path(name)
    if path is None:  # `from pgolf.x import name` also yields pgolf.x.name
        return None
    stat = path.stat()
    return _read_module(str(path), name, stat.st_mtime_ns, stat.st_size)


def _closure(roots: list[str], follow_lazy: bool) -> dict[str, tuple[str, frozenset[str], frozenset[str]]]:
    """Modules reached from roots by module-level imports (and their parent packages); with
    follow_lazy, also by function-level imports of modules OPTIONAL_MODULES does not list."""
    found: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        read = None if name in found else _read(name)
        if read is None:
            continue
        found[name] = read
        pending.extend(read[1])
        if follow_lazy:  # an unclassified lazy import is bundled, so it never misses; a test names it
            pending.extend(m for m in read[2] if m not in OPTIONAL_MODULES)
        pending.extend(name.rsplit(".", i)[0] for i in range(1, name.count(".")))  # parent packages
    return found


def bundle_modules(cfg: Config | Mapping[str, Any] | None = None) -> dict[str, str]:
    """Source (as on disk) of every pgolf module a run of cfg needs, by module name, sorted:
    the module-level import closure of the entry module and of the optional modules cfg enables
    (OPTIONAL_MODULES). None: the default config."""
    cfg = _as_config(cfg)
    roots = [*ROOT_MODULES, *(name for name, needed in OPTIONAL_MODULES.items() if needed(cfg))]
    return {name: read[0] for name, read in sorted(_closure(roots, follow_lazy=True).items())}


def unclassified_lazy_imports() -> list[str]:
    """Function-level pgolf imports, anywhere in any config's closure, of a module that is
    neither in OPTIONAL_MODULES nor imported at module level wherever the importer is bundled.
    Each is a module a bundle could lack; it must be classified (empty when all is well)."""
    every = _closure([*ROOT_MODULES, *OPTIONAL_MODULES], follow_lazy=True)
    problems = []
    for name, (_, _, lazy) in sorted(every.items()):
        always_with_it = _closure([*ROOT_MODULES, name], follow_lazy=False)
        problems += [f"{name} imports {target} inside a function" for target in sorted(lazy)
                     if target not in OPTIONAL_MODULES and target not in always_with_it and _read(target)]
    return problems


# --- which config ----------------------------------------------------------------------------
def _as_config(cfg: Config | Mapping[str, Any] | None) -> Config:
    if cfg is None:
        return Config()
    return cfg if isinstance(cfg, Config) else config_from_dict(cfg)


def bundle_config(cfg: Config | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The recipe of a run: its resolved config without the run's identity (RUN_IDENTITY_KEYS),
    as its difference from pgolf's defaults (the official baseline); a nested mapping."""
    resolved = _as_config(cfg).to_dict()
    defaults = Config().to_dict()
    for key in RUN_IDENTITY_KEYS:  # they take their defaults, so every seed of a group ships one file
        section, name = key.split(".")
        resolved[section][name] = defaults[section][name]
    diff: dict[str, dict[str, Any]] = {}
    for section, values in resolved.items():
        changed = {k: v for k, v in values.items() if v != defaults[section][k]}
        if changed:
            diff[section] = changed
    return diff


# --- the file --------------------------------------------------------------------------------
def default_compressor() -> str:
    """brotli (quality 11) when importable here, else lzma: the one bundles are packed with."""
    try:
        import brotli  # noqa: F401
    except ImportError:
        return "lzma"
    return "brotli"


def registries(sources: Mapping[str, str]) -> dict[str, tuple[str, bool]]:
    """REGISTRY -> (the config key choosing its entries, whether it accepts "auto"), read from
    the ``REGISTRY = Registry(slot, "section.key", ..., auto=...)`` lines of the sources."""
    found = {}
    for source in sources.values():
        for stmt in ast.parse(source).body:
            value = getattr(stmt, "value", None)
            if (isinstance(stmt, ast.Assign) and isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                    and value.func.id == "Registry" and len(value.args) >= 2 and isinstance(stmt.targets[0], ast.Name)):
                auto = any(k.arg == "auto" and getattr(k.value, "value", False) for k in value.keywords)
                found[stmt.targets[0].id] = (value.args[1].value, auto)
    return found


def unselected_entries(cfg: Config, sources: Mapping[str, str]) -> set[tuple[str, str]]:
    """The registry entries (REGISTRY, name) in the sources that cfg does not choose. A slot
    set to "auto" chooses from other keys at run time: all its entries stay."""
    keys = registries(sources)
    entries = set()
    for source in sources.values():
        tree = ast.parse(source)
        constants = string_constants(tree)
        entries.update(registration(d, constants) for stmt in tree.body for d in getattr(stmt, "decorator_list", ()))
    unselected = set()
    for registry, name in entries - {None}:
        if registry in keys:
            key, auto = keys[registry]
            chosen = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
            chosen = chosen if isinstance(chosen, list) else [chosen]
            if name not in chosen and not (auto and "auto" in chosen):
                unselected.add((registry, name))
    return unselected


def shipped_sources(cfg: Config | Mapping[str, Any] | None = None,
                    sources: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a bundle for cfg ships of each module, before minifying: the sources (default
    bundle_modules(cfg)) with unreferenced definitions and unselected registry entries shaken out."""
    cfg = _as_config(cfg)
    sources = bundle_modules(cfg) if sources is None else sources
    return shake(sources, keep=LOADER_CALLS, unselected=unselected_entries(cfg, sources))


def pack_modules(shipped: Mapping[str, str], compressor: str) -> bytes:
    """base85 of the compressed modules as name, minified source, name, ... (shipped_sources
    through minify_source)."""
    text = MODULE_SEPARATOR.join(part for name, source in shipped.items()
                                 for part in (name, minify_source(source, _filename(name))))
    return _pack_text(text, compressor)


def _filename(name: str) -> str:
    path = _module_path(name)
    return str(path.relative_to(PACKAGE_DIR.parent)) if path else name


@functools.lru_cache(maxsize=4)
def _pack_text(text: str, compressor: str) -> bytes:
    data = text.encode("utf-8")
    if compressor == "brotli":
        try:
            import brotli
        except ImportError:
            raise BundleError("this train_gpt.py is to be brotli-packed (the runs counted one packed so) but brotli "
                              "is not installed: pip install brotli") from None

        packed = brotli.compress(data, quality=11)
    elif compressor == "lzma":  # the .lzma container's 13-byte header instead of .xz's ~60
        packed = lzma.compress(data, format=lzma.FORMAT_ALONE, preset=9)
    else:
        raise BundleError(f"unknown compressor {compressor!r}; use one of {', '.join(COMPRESSORS)}")
    return base64.b85encode(packed)


def build_bundle(cfg: Config | Mapping[str, Any], sources: Mapping[str, str] | None = None,
                 compressor: str | None = None) -> bytes:
    """The bytes of train_gpt.py for cfg's recipe (bundle_config): sources default to
    bundle_modules(cfg), compressor to default_compressor(). Same inputs, same bytes."""
    cfg = _as_config(cfg)
    sources = bundle_modules(cfg) if sources is None else sources
    compressor = compressor or default_compressor()
    from pgolf import __version__

    needs = "torch numpy sentencepiece" + (" brotli" if compressor == "brotli" else "")
    header = (f"# pgolf {__version__}, {len(sources)} modules {compressor}-packed; needs {needs}. "
              "Run: [SEED=N RUN_ID=ID DATA_PATH=DIR TOKENIZER_PATH=FILE] [torchrun --nproc_per_node=8] train_gpt.py\n")
    config = f"CONFIG={bundle_config(cfg)!r}\n"
    packed = 'PACKED=b"' + pack_modules(shipped_sources(cfg, sources), compressor).decode("ascii") + '"\n'
    loader = LOADER.format(compressor=compressor, bundle=BUNDLE_NAME, entry=ENTRY_MODULE)
    return (header + config + packed + loader).encode("utf-8")


def code_bytes_for(cfg: Config | Mapping[str, Any], compressor: str | None = None) -> tuple[int, str]:
    """(counted code bytes, description) for a run of cfg: the length of the train_gpt.py
    `pgolf submit` writes for it. (Inside a running bundle, pgolf.compress.accounting counts the
    running file instead; this module is not shipped.)"""
    compressor = compressor or default_compressor()
    sources = bundle_modules(cfg)
    data = build_bundle(cfg, sources, compressor)
    return len(data), describe_code(data, f"the length of {BUNDLE_NAME} as `pgolf submit` writes it: {len(sources)} "
                                          f"pgolf modules minified, {compressor} + base85 packed, and the config")


def compressor_of(code_description: str) -> str | None:
    """The compressor a counted description names (so submit ships the file that was counted)."""
    return next((c for c in COMPRESSORS if f"{c} + base85" in code_description), None)
