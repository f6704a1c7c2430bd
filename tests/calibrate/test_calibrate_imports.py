"""The calibrate package: one idea per module, imported only downwards (no import cycles)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import bitflux

SRC = Path(bitflux.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Static graph of bitflux modules: module -> bitflux modules it imports at any level."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    root = ".".join(base + ([node.module] if node.module else []))
                else:
                    root = node.module or ""
                subs = [f"{root}.{a.name}" for a in node.names]
                # `from pkg import submodule` needs the submodule; `from pkg import name` needs pkg itself
                targets = subs + ([root] if any(t not in modules for t in subs) else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in modules:  # `from .x import name`: the module is x, not x.name
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycle_through(graph: dict[str, set[str]], prefix: str) -> list[str] | None:
    """A cycle of imports that passes through a module named `prefix*`, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d == "bitflux":  # `from .. import x` style package-level imports are not used here
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                if any(c.startswith(prefix) for c in cycle):
                    return cycle
            elif d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m.startswith(prefix) and m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_calibrate_package_has_no_import_cycle():
    graph = _import_graph()
    mods = [m for m in graph if m.startswith("bitflux.calibrate.")]
    assert {"bitflux.calibrate.config", "bitflux.calibrate.joint", "bitflux.calibrate.blockwise"} <= set(mods)
    assert _cycle_through(graph, "bitflux.calibrate") is None


def test_cycle_check_can_fail():
    graph = {"bitflux.calibrate.a": {"bitflux.calibrate.b"}, "bitflux.calibrate.b": {"bitflux.calibrate.a"}}
    assert _cycle_through(graph, "bitflux.calibrate") == ["bitflux.calibrate.a", "bitflux.calibrate.b", "bitflux.calibrate.a"]


def test_every_submodule_imports_on_its_own_and_the_public_names_resolve():
    graph = _import_graph()
    for m in sorted(m for m in graph if m.startswith("bitflux.calibrate.")):
        importlib.import_module(m)
    # `bitflux.calibrate` is the function; the package's names are reachable with from-imports
    from bitflux.calibrate import CalibConfig, calibrate

    assert bitflux.calibrate is calibrate and callable(bitflux.calibrate) and bitflux.CalibConfig is CalibConfig
