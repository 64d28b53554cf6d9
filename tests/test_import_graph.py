"""No import circles among the project's modules: each module imports only modules below it.

The graph is read from the source with `ast`, never by importing (importing would run torch and
hide circles that Python resolves by luck of order). Every import statement counts, wherever it
sits: at the top, inside a function (a lazy import still ties the two modules together), and under
`if TYPE_CHECKING:` (a type-only import back, such as a feature module naming the client's class,
is the coupling this test exists to refuse; type checkers follow it like any other import).

Edges go to the module an import names: `import a.b`, `from a import b` (b a module) and
`from a.b import name` all point at `a.b`; `from a import name` (name defined in `a/__init__.py`)
points at the package `a`. The parent packages Python runs on the way (`a/__init__.py` for `a.b`)
are not edges: a package's `__init__` may gather its submodules without every submodule that
imports a sibling closing a circle through it. Imports by string (`importlib.import_module`) are not
seen; the project has none.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "bot", "training", "emaki")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_under(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))}


def _absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name a (possibly relative) `from ... import` refers to."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]  # `from . import x` in a/b.py means package a
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _deepest_module(name: str, modules: dict[str, Path]) -> str | None:
    """`name` if it is a project module, else its nearest enclosing project module (a.b.C -> a.b)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    path = modules[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):  # every statement, function bodies and TYPE_CHECKING blocks included
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _deepest_module(alias.name, modules)
                if target is not None:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node.module, node.level, name, path.name == "__init__.py")
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                target = submodule if submodule in modules else _deepest_module(source, modules)
                if target is not None:
                    found.add(target)
    found.discard(name)
    return found


def graph_of(modules: dict[str, Path]) -> dict[str, frozenset[str]]:
    return {name: frozenset(imports_of(name, modules)) for name in modules}


@cache
def import_graph() -> dict[str, frozenset[str]]:
    return graph_of(modules_under(ROOT, PACKAGES))


def circles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def a_cycle(component: list[str], graph: dict[str, frozenset[str]]) -> list[str]:
    """One concrete path around the component, to name in the failure (a -> b -> c -> a)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first from start, inside the component, back to start
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    return component


def circles_touching(package: str) -> list[str]:
    graph = import_graph()
    return [
        " -> ".join(a_cycle(component, graph)) + f"  ({len(component)} modules: {', '.join(component)})"
        for component in circles(graph)
        if any(m == package or m.startswith(f"{package}.") for m in component)
    ]


def test_the_graph_sees_lazy_type_only_and_from_package_imports() -> None:
    # The reader itself, on imports this project uses: a from-package module, a function-level one.
    graph = import_graph()
    assert "bot.render" in graph["bot.client"]  # `from bot import render`
    assert "engine.settings" in graph["bot.client"]  # `from engine.settings import ...`
    assert "bot.state" in graph["emaki.jobs_cmd"]  # inside a function
    assert "engine.coordinator.store" in graph["bot.state"]  # under `if TYPE_CHECKING:` only


def test_a_circle_through_a_lazy_and_a_type_only_import_is_named(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from pkg.a import run\n")  # the package door: not an edge back
    (package / "a.py").write_text("def run():\n    from pkg import b\n    return b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import run\n")
    (package / "c.py").write_text("import pkg.a\nfrom pkg import run\n")  # downward only
    graph = graph_of(modules_under(tmp_path, ("pkg",)))
    assert graph["pkg.c"] == {"pkg.a", "pkg"}
    assert circles(graph) == [["pkg.a", "pkg.b"]]
    assert a_cycle(["pkg.a", "pkg.b"], graph) == ["pkg.a", "pkg.b", "pkg.a"]


@pytest.mark.parametrize(
    "package",
    [
        "engine",
        "bot",
        "training",
        "emaki",
    ],
)
def test_no_import_circle(package: str) -> None:
    found = circles_touching(package)
    assert not found, f"import circle(s) through {package}:\n" + "\n".join(found)


# Above the client: the package's lazy door (`from bot import create_bot`) and the process that runs it.
CLIENT_USERS = {"bot", "bot.service"}


def test_feature_modules_never_import_the_client() -> None:
    # The client assembles the Cogs; a Cog that imported it back would make the client a hub again.
    graph = import_graph()
    importers = {name for name, targets in graph.items() if "bot.client" in targets and name.split(".")[0] == "bot"}
    assert importers <= CLIENT_USERS, f"import the client back: {sorted(importers - CLIENT_USERS)}"


# The layers, top to bottom: a module may import its own layer and the ones below, never one above.
# engine's floor holds the values both sides share; the renderer never sees the coordinator (or the
# store), so it runs unchanged in a Ray actor on a machine without the data dir.
LAYERS = (
    ("emaki",),
    ("bot",),
    ("training",),
    ("engine.coordinator",),
    ("engine.render",),
    ("engine.settings", "engine.params", "engine.events", "engine.errors", "engine"),
)


def layer_of(module: str) -> int:
    for depth, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(f"{p}.") for p in prefixes if p != "engine") or module == "engine":
            return depth
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def test_every_import_runs_downward() -> None:
    graph = import_graph()
    upward = [
        f"{name} -> {target}"
        for name, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) < layer_of(name)
    ]
    assert not upward, "imports against the layers (emaki > bot > training > coordinator > render > floor):\n" + (
        "\n".join(upward)
    )


def test_the_render_package_never_imports_the_store() -> None:
    graph = import_graph()
    render = {name: targets for name, targets in graph.items() if name.startswith("engine.render")}
    assert render, "engine.render has no modules: the layout changed, update this test"
    assert not [n for n, t in render.items() if "engine.coordinator.store" in t]
