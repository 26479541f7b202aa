"""The package layout (design.md, "Data flow"; README, "Layout"): the project's modules import one
way, counting imports inside functions too; each subpackage imports only the layers below it;
no module imports another's private name; imports are deferred only where the layout says so.

Read from the source (``ast``), nothing is imported: a cycle held together by a function-level
import fails here even when it never runs in a test.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alpa_lite", "cost_model", "ilp", "dp_stages")

# Each layer and what it may import (besides itself), lowest first; mirrors the subpackages'
# docstrings. "alpa_lite" is the package's own __init__ (the IR eagerly, the API lazily).
MAY_IMPORT = {
    "alpa_lite.ir": set(),
    "alpa_lite": {"alpa_lite.ir"},
    "cost_model": {"alpa_lite.ir"},
    "ilp": {"alpa_lite.ir", "cost_model"},
    "dp_stages": {"alpa_lite.ir"},
    "alpa_lite.tracing": {"alpa_lite.ir"},
    "alpa_lite.result": {"alpa_lite.ir", "cost_model"},
    "alpa_lite.measure": {"alpa_lite.ir", "cost_model"},
    "alpa_lite.report": {"alpa_lite.ir"},
    "alpa_lite.intra": {"alpa_lite.ir", "alpa_lite.tracing", "alpa_lite.result", "cost_model", "ilp"},
    "alpa_lite.emit": {"alpa_lite.ir", "alpa_lite.tracing", "alpa_lite.result", "alpa_lite.intra", "cost_model"},
    "alpa_lite.pipeline": {"alpa_lite.ir", "alpa_lite.tracing", "alpa_lite.result", "alpa_lite.intra",
                           "alpa_lite.emit", "alpa_lite.measure", "cost_model", "ilp", "dp_stages"},
    "alpa_lite.api": {"alpa_lite.ir", "alpa_lite.tracing", "alpa_lite.result", "alpa_lite.intra", "alpa_lite.emit",
                      "alpa_lite.pipeline"},
    "alpa_lite.serving": {"alpa_lite.ir", "alpa_lite.tracing", "alpa_lite.result", "alpa_lite.intra", "alpa_lite.emit",
                          "alpa_lite.pipeline", "alpa_lite.api", "cost_model"},
    "alpa_lite.cli": {"alpa_lite", "alpa_lite.ir", "alpa_lite.result", "alpa_lite.measure", "alpa_lite.report"},
}
# Deferred on purpose: the CLI sets XLA_FLAGS before anything that may start jax's backends, and
# the Plan's facade methods (compile, check, summary, _repr_html_) reach the layers above it.
DEFERRED_OK = {"alpa_lite.cli": None, "alpa_lite.result.plan": "Plan"}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, tree: ast.AST) -> Iterator[tuple[str, ast.AST, list[str]]]:
    """(imported project module, import node, names imported from it) for every import in the
    file, with the chain of enclosing classes and functions."""

    def visit(node: ast.AST, scope: list[str]) -> Iterator[tuple[str, ast.AST, list[str]]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name in MODULES:
                        yield alias.name, child, scope
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module in MODULES:
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    yield (sub if sub in MODULES else child.module), child, scope
            kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            yield from visit(child, scope + [child.name] if isinstance(child, kinds) else scope)

    yield from visit(tree, [])


def _layer(module: str) -> str:
    for layer in sorted(MAY_IMPORT, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} belongs to no layer: add it to MAY_IMPORT")


def _trees() -> dict[str, ast.AST]:
    return {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


TREES = _trees()


def _deferred_ok(module: str, scope: list[str]) -> bool:
    if module not in DEFERRED_OK:
        return False
    owner = DEFERRED_OK[module]
    return owner is None or scope[:1] == [owner]


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    for m, tree in TREES.items():
        for target, _, scope in _imports(m, tree):
            if target != m and not (scope and _deferred_ok(m, scope)):
                g.add_edge(m, target)
    return g


def test_no_import_cycle_counting_function_level_imports():
    cycles = list(nx.simple_cycles(_graph()))
    assert not cycles, "import cycles: " + "; ".join(" → ".join([*c, c[0]]) for c in cycles[:5])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_the_layers_below(module):
    mine = _layer(module)
    wrong = sorted({t for t, _, scope in _imports(module, TREES[module])
                    if _layer(t) != mine and _layer(t) not in MAY_IMPORT[mine]
                    and not (scope and _deferred_ok(module, scope))})
    assert not wrong, f"{module} ({mine}) imports {wrong}; it may import {sorted(MAY_IMPORT[mine])}"


def test_imports_are_deferred_only_where_the_layout_says():
    deferred = [f"{m}:{node.lineno} ({'.'.join(scope)})" for m, tree in TREES.items()
                for _, node, scope in _imports(m, tree) if scope and not _deferred_ok(m, scope)]
    assert not deferred, f"function-level imports of project modules: {deferred}"


def test_no_private_name_imported_from_another_module():
    private = sorted({f"{m}:{node.lineno} imports {a.name} from {node.module}" for m, tree in TREES.items()
                      for _, node, _ in _imports(m, tree) if isinstance(node, ast.ImportFrom)
                      for a in node.names if a.name.startswith("_")})
    assert not private, private


def test_every_subpackage_says_what_it_holds_and_may_import():
    for m, tree in TREES.items():
        if MODULES[m].name == "__init__.py" and m.startswith("alpa_lite."):
            doc = ast.get_docstring(tree) or ""
            assert "May import" in doc, f"{m}'s docstring does not say what it may import"


def test_no_subpackage_shadows_a_public_name():
    """``alpa_lite.X`` for a subpackage X becomes the module once it is imported, hiding the
    lazily loaded ``al.X`` (why the tracer's folder is ``tracing``, not ``trace``)."""
    init = TREES["alpa_lite"]
    lazy = next(n.value for n in init.body if isinstance(n, ast.Assign) and n.targets[0].id == "_LAZY")
    public = {k.value for k in lazy.keys}
    children = {m.split(".")[1] for m in MODULES if m.startswith("alpa_lite.")}
    assert not public & children


def test_the_cycle_check_sees_a_function_level_cycle():
    a = ast.parse("def f():\n    from alpa_lite.api import plan\n")
    assert [t for t, _, _ in _imports("alpa_lite.ir.graph", a)] == ["alpa_lite.api"]
