"""Drop the module-level functions, classes and tables (``NAME = <value that runs no code>``)
that nothing shipped refers to, before a bundle is minified. A submission pays for every byte it
ships, and modules carry helpers that only the package's other tools call (the lab, data
building, audits, tests).

A definition stays when its name occurs in live code: module-level statements, another kept
definition, or a string (as getattr and __all__ name things). Names are matched across all
shipped modules, so the rule keeps too much rather than too little. Decorated definitions and
dunder names always stay, since a decorator may register what it decorates; but a registry
entry (decorated only by ``REGISTRY.register("name")``) that the caller lists as unselected (its
config does not choose it) stays only if shipped code names it. ``__all__`` is dropped unless a
shipped module star-imports: it only names a module's API for ``import *`` and docs, and its
strings would otherwise keep every definition it lists. Methods go by the same rule, in classes
only pgolf code calls (no base from outside pgolf, which might call one by its protocol name).
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterable, Mapping

DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _signature_annotations(node: ast.AST) -> set[int]:
    """ids of the argument and return annotations under node: minify_source removes them from
    the shipped text, so the names in them keep nothing alive."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg) and sub.annotation is not None:
            found.add(id(sub.annotation))
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.returns is not None:
            found.add(id(sub.returns))
    return found


def _walk_except(node: ast.AST, skip: set[int]):
    if id(node) in skip:
        return
    yield node
    for child in ast.iter_child_nodes(node):
        yield from _walk_except(child, skip)


def _names_in(node: ast.AST, skip: Collection[int] = ()) -> set[str]:
    """The names node uses (``skip``: ids of nodes not to look into)."""
    found = set()
    for sub in _walk_except(node, _signature_annotations(node) | set(skip)):
        if isinstance(sub, ast.Name):
            found.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            found.add(sub.attr)
        elif isinstance(sub, ast.alias):
            found.update((sub.name.rpartition(".")[2], sub.asname or ""))
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value.isidentifier():
            found.add(sub.value)
    return found


def string_constants(tree: ast.Module) -> dict[str, str]:
    """The module's ``NAME = "text"`` assignments (a registration may name its entry so)."""
    return {stmt.targets[0].id: stmt.value.value for stmt in tree.body
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)}


def registration(decorator: ast.expr, constants: Mapping[str, str]) -> tuple[str, str] | None:
    """(REGISTRY, name) of a ``REGISTRY.register("name")`` (or ``(NAME)``, a string constant of
    the module) decorator, else None."""
    if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
            and decorator.func.attr == "register" and isinstance(decorator.func.value, ast.Name)
            and len(decorator.args) == 1):
        return None
    arg = decorator.args[0]
    name = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", None))
    return (decorator.func.value.id, name) if isinstance(name, str) else None


# What a value assigned at module level may be built of and still be dropped unreferenced:
# evaluating it runs no code of ours (no call, subscript or walrus) and binds nothing else.
_PURE = (ast.Constant, ast.Name, ast.Attribute, ast.Load, ast.Dict, ast.List, ast.Tuple, ast.Set, ast.BinOp,
         ast.UnaryOp, ast.BoolOp, ast.Compare, ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.Starred,
         ast.JoinedStr, ast.FormattedValue, ast.Lambda, ast.arguments, ast.arg)


def defined_names(stmt: ast.stmt) -> list[str]:
    """The names a droppable statement defines: a def or class, or ``NAME = <pure value>`` (a
    table or constant: ``EXIT_CODES = {...}``); [] for any other statement."""
    if isinstance(stmt, DEFINITIONS):
        return [stmt.name]
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
    if (targets and getattr(stmt, "value", None) is not None and all(isinstance(t, ast.Name) for t in targets)
            and all(isinstance(node, _PURE) for node in ast.walk(stmt.value))):
        return [t.id for t in targets]
    return []


def _is_root(stmt: ast.stmt, unselected: Collection[tuple[str, str]], constants: Mapping[str, str]) -> bool:
    names = defined_names(stmt)
    if not names or any(name.startswith("__") for name in names):
        return True
    return any(registration(d, constants) not in unselected for d in getattr(stmt, "decorator_list", ()))


def _is_all(stmt: ast.stmt) -> bool:
    """``__all__ = [...]`` (or annotated, or extended with +=)."""
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
    return isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and any(
        isinstance(t, ast.Name) and t.id == "__all__" for t in targets)


def _star_imports(trees: Iterable[ast.Module]) -> bool:
    return any(isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names)
               for tree in trees for node in ast.walk(tree))


# A method may go when nothing names it: in a class that only pgolf code calls (no base outside
# pgolf, which might call a method by its protocol name), with none of these decorators or none.
_METHOD_DECORATORS = {"property", "staticmethod", "classmethod", "cached_property", "functools.cached_property"}


def _methods_to_shake(trees: Iterable[ast.Module]) -> dict[int, list[ast.stmt]]:
    """id(class) -> its methods that may be dropped, for every plain class: bases only ``object``
    or other plain classes of the sources (by a name defined once), no metaclass or keywords,
    no decorator but ``dataclass``."""
    classes: dict[str, list[ast.ClassDef]] = {}
    for tree in trees:
        for stmt in tree.body:
            if isinstance(stmt, ast.ClassDef):
                classes.setdefault(stmt.name, []).append(stmt)
    memo: dict[int, bool] = {}

    def plain(cls: ast.ClassDef) -> bool:
        if id(cls) not in memo:
            memo[id(cls)] = False  # a cycle is not plain
            memo[id(cls)] = (not cls.keywords and all(
                ast.unparse(d).split("(")[0] in ("dataclass", "dataclasses.dataclass") for d in cls.decorator_list)
                and all(isinstance(b, ast.Name) and (b.id == "object" or (len(classes.get(b.id, ())) == 1
                                                                          and plain(classes[b.id][0])))
                        for b in cls.bases))
        return memo[id(cls)]

    return {id(cls): [m for m in cls.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and not m.name.startswith("__")
                      and all(ast.unparse(d) in _METHOD_DECORATORS for d in m.decorator_list)]
            for same in classes.values() for cls in same if plain(cls)}


def _prunable_import(stmt: ast.stmt, modules: Collection[str]) -> bool:
    """``from pgolf.x import a, b`` of definitions and values (not of modules, whose import runs
    them): the names nothing live uses can go."""
    return (isinstance(stmt, ast.ImportFrom) and not stmt.level and (stmt.module or "").split(".")[0] == "pgolf"
            and not any(a.name == "*" or f"{stmt.module}.{a.name}" in modules for a in stmt.names))


def _pruned_import(stmt: ast.ImportFrom, live: set[str]) -> str | None:
    """The import without the names nothing live uses (``import pgolf.x`` when none is left:
    the module still runs, as it may register entries); None when every name is used."""
    used = [a for a in stmt.names if (a.asname or a.name) in live]
    if len(used) == len(stmt.names):
        return None
    if not used:
        return f"import {stmt.module}\n"
    return f"from {stmt.module} import " + ", ".join(ast.unparse(a) for a in used) + "\n"


def shake(sources: Mapping[str, str], keep: Iterable[str] = (),
          unselected: Collection[tuple[str, str]] = ()) -> dict[str, str]:
    """The sources with every unreferenced module-level definition, and method of a plain class
    (_methods_to_shake), removed (its lines cut out of the text, decorators included) and the
    module-level imports of pgolf names nothing live
    uses pruned; everything else is kept as written. ``keep``: names used from outside the
    sources (the bundle's loader calls its main); ``unselected``: registry entries (REGISTRY,
    name) the config does not choose."""
    trees = {name: ast.parse(source) for name, source in sources.items()}
    live: set[str] = set(keep)
    pending: list[tuple[str, ast.stmt]] = []  # definitions not yet known to be live
    imports: list[tuple[str, ast.ImportFrom]] = []  # an import alone makes nothing live
    edits: dict[str, list[tuple[ast.stmt, str]]] = {}  # module -> (statement, its replacement)
    methods = _methods_to_shake(trees.values())
    own_methods = {cls_id: {id(m) for m in found} for cls_id, found in methods.items()}
    kept: set[int] = set()  # statements known to be live: roots, kept definitions, kept methods

    def use(stmt: ast.stmt) -> None:
        kept.add(id(stmt))
        live.update(_names_in(stmt, own_methods.get(id(stmt), ())))  # a class's methods count once kept

    drop_all = not _star_imports(trees.values())
    for name, tree in trees.items():
        constants = string_constants(tree)
        for stmt in tree.body:
            if drop_all and _is_all(stmt):
                edits.setdefault(name, []).append((stmt, ""))
            elif _prunable_import(stmt, sources):
                imports.append((name, stmt))
            elif _is_root(stmt, unselected, constants):
                use(stmt)
            else:
                pending.append((name, stmt))
            pending += [(name, m) for m in methods.get(id(stmt), ())]
    owner = {id(m): cls_id for cls_id, found in methods.items() for m in found}
    changed = True
    while changed:  # a kept definition can make others live
        changed = False
        for _, stmt in pending:
            cls_id = owner.get(id(stmt))
            if id(stmt) in kept or (cls_id is not None and cls_id not in kept):
                continue  # kept already, or a method of a class not (yet) kept
            if any(name in live for name in defined_names(stmt)):
                use(stmt)
                changed = True
    for name, stmt in pending:
        if id(stmt) not in kept and (id(stmt) not in owner or owner[id(stmt)] in kept):
            edits.setdefault(name, []).append((stmt, ""))
    for name, tree in trees.items():  # a kept class left with no statement gets a `pass`
        for cls in (s for s in tree.body if id(s) in kept and id(s) in methods):
            if all(id(m) not in kept and id(m) in owner for m in cls.body):
                edits[name] = [(m, r) for m, r in edits[name] if m is not cls.body[0]]
                edits[name].append((cls.body[0], " " * cls.body[0].col_offset + "pass\n"))
    for name, stmt in imports:
        pruned = _pruned_import(stmt, live)
        if pruned is not None:
            edits.setdefault(name, []).append((stmt, pruned))
    out = dict(sources)
    for name, changes in edits.items():
        lines = sources[name].splitlines(keepends=True)
        for stmt, replacement in sorted(changes, key=lambda change: change[0].lineno, reverse=True):
            lines[_first_line(stmt) - 1: stmt.end_lineno] = [replacement] if replacement else []
        out[name] = "".join(lines)
    return out


def _first_line(stmt: ast.stmt) -> int:
    return min([stmt.lineno, *(d.lineno for d in getattr(stmt, "decorator_list", ()))])
