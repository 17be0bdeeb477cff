"""Imports point one way through the pipeline's stages, and no module imports itself back.

cli -> lab -> train -> eval -> runs -> config -> compress -> model -> data -> runtime; the config
sections (`pgolf/<stage>/config.py`), `pgolf.rules` and the package root are leaves anyone may
import. Read with the bundler's own import scanner, lazy imports inside functions included.
"""

from pathlib import Path

import pytest

import pgolf
from pgolf.train.bundle import _imported_pgolf_modules

PACKAGE_DIR = Path(pgolf.__file__).resolve().parent
RANKS = {"__main__": 10, "cli": 9, "lab": 8, "train": 7, "eval": 6, "runs": 5, "config": 4, "compress": 3,
         "model": 2, "data": 1, "runtime": 0}
LEAVES = {"pgolf", "pgolf.rules"}


def modules() -> dict[str, str]:
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text(encoding="utf-8")
    return out


MODULES = modules()


def resolve(name: str) -> str | None:
    """The module an imported name lives in (`pgolf.x.y.func` -> `pgolf.x.y`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def stage(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def is_leaf(module: str) -> bool:
    return module in LEAVES or (module.endswith(".config") and module.count(".") == 2)


def edges() -> dict[str, set[str]]:
    graph = {}
    for name, source in MODULES.items():
        package = name if PACKAGE_DIR.joinpath(*name.split(".")[1:], "__init__.py").is_file() else name
        targets = {resolve(t) for t in _imported_pgolf_modules(source, package if package == name else name)}
        graph[name] = {t for t in targets if t and t != name}
    return graph


GRAPH = edges()


def test_every_module_has_a_stage():
    assert {stage(m) for m in MODULES if not is_leaf(m)} <= set(RANKS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_pipeline(module):
    if is_leaf(module):
        assert all(is_leaf(t) for t in GRAPH[module]), f"leaf {module} imports {GRAPH[module]}"
        return
    upward = sorted(t for t in GRAPH[module] if not is_leaf(t) and stage(t) != stage(module)
                    and RANKS[stage(t)] >= RANKS[stage(module)])
    assert not upward, f"{module} imports {upward}, which sit at or above its stage '{stage(module)}'"


def test_no_import_cycles():
    """Tarjan's strongly connected components: every one must be a single module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_relative_imports():
    """The bundler and this test read absolute imports; a relative one would be misread."""
    offenders = [m for m, s in MODULES.items() if any(line.lstrip().startswith("from .") for line in s.splitlines())]
    assert not offenders
