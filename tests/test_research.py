"""The research scripts stay runnable: every script imports, and every `bitflux` name any of them
imports (at module level or inside a function) still exists, so a refactor of the package cannot
silently break them. Their full runs take minutes and are checked by hand (research/README.md)."""

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

RESEARCH = Path(__file__).resolve().parents[1] / "research"
SCRIPTS = sorted(p for p in RESEARCH.glob("*.py"))


def test_every_script_is_indexed():
    index = (RESEARCH / "README.md").read_text()
    assert SCRIPTS, "no research scripts found"
    for p in SCRIPTS:
        assert f"`{p.name}`" in index, f"{p.name} is missing from research/README.md"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bitflux_imports_resolve(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bitflux":
            mod = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(mod, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                    f"{path.name}: from {node.module} import {alias.name} no longer resolves"
                )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bitflux":
                    importlib.import_module(alias.name)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_module_loads(path, monkeypatch):
    monkeypatch.syspath_prepend(str(RESEARCH))  # the scripts import common/overrides as siblings
    spec = importlib.util.spec_from_file_location(f"_research_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top level only: main() runs under __main__
    if path.stem not in ("common", "overrides"):
        assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
    sys.modules.pop(f"_research_{path.stem}", None)
