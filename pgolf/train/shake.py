"""Drop the module-level functions and classes that nothing shipped refers to, before a bundle
is minified. A submission pays for every byte it ships, and modules carry helpers that only the
package's other tools call (the lab, data building, audits, tests).

A definition stays when its name occurs in live code: module-level statements, another kept
definition, or a string (as getattr and __all__ name things). Names are matched across all
shipped modules, so the rule keeps too much rather than too little. Decorated definitions and
dunder names always stay: a decorator may register what it decorates. ``__all__`` is dropped
unless a shipped module star-imports: it only names a module's API for ``import *`` and docs,
and its strings would otherwise keep every definition it lists.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping

DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _names_in(node: ast.AST) -> set[str]:
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            found.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            found.add(sub.attr)
        elif isinstance(sub, ast.alias):
            found.update((sub.name.rpartition(".")[2], sub.asname or ""))
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value.isidentifier():
            found.add(sub.value)
    return found


def _is_root(stmt: ast.stmt) -> bool:
    return not isinstance(stmt, DEFINITIONS) or bool(stmt.decorator_list) or stmt.name.startswith("__")


def _is_all(stmt: ast.stmt) -> bool:
    """``__all__ = [...]`` (or annotated, or extended with +=)."""
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
    return isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and any(
        isinstance(t, ast.Name) and t.id == "__all__" for t in targets)


def _star_imports(trees: Iterable[ast.Module]) -> bool:
    return any(isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names)
               for tree in trees for node in ast.walk(tree))


def shake(sources: Mapping[str, str], keep: Iterable[str] = ()) -> dict[str, str]:
    """The sources with every unreferenced module-level definition removed (its lines cut out
    of the text; everything else is kept as written). ``keep``: names used from outside the
    sources (the bundle's loader calls its main)."""
    trees = {name: ast.parse(source) for name, source in sources.items()}
    live: set[str] = set(keep)
    pending: list[tuple[str, ast.stmt]] = []  # definitions not yet known to be live
    dropped: dict[str, list[ast.stmt]] = {}
    drop_all = not _star_imports(trees.values())
    for name, tree in trees.items():
        for stmt in tree.body:
            if drop_all and _is_all(stmt):
                dropped.setdefault(name, []).append(stmt)
            elif _is_root(stmt):
                live |= _names_in(stmt)
            else:
                pending.append((name, stmt))
    kept: set[int] = set()
    changed = True
    while changed:  # a kept definition can make others live
        changed = False
        for _, stmt in pending:
            if id(stmt) not in kept and stmt.name in live:
                kept.add(id(stmt))
                live |= _names_in(stmt)
                changed = True
    for name, stmt in pending:
        if id(stmt) not in kept:
            dropped.setdefault(name, []).append(stmt)
    out = dict(sources)
    for name, stmts in dropped.items():
        lines = sources[name].splitlines(keepends=True)
        for stmt in sorted(stmts, key=lambda s: s.lineno, reverse=True):
            del lines[stmt.lineno - 1: stmt.end_lineno]
        out[name] = "".join(lines)
    return out
