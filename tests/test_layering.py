"""The import layers (DESIGN.md): plain data at the bottom, the engine above it, controllers,
environments, benches and the server on top; nothing imports upward."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["adactl.interface", "adactl.runtime.types", "adactl.runtime"])
def test_plain_data_loads_no_engine_and_no_transformers(module):
    """A custom server that imports the interface's types does not load transformers or our
    engine (the runtime package loads its parts on first use)."""
    loaded = _loaded_after(f"import {module}")
    assert "transformers" not in loaded
    assert not {"adactl.runtime.engine", "adactl.runtime.kv", "adactl.runtime.models"} & loaded


def test_runtime_names_still_import():
    loaded = _loaded_after("from adactl.runtime import Engine, SamplingParams, load_pair")
    assert {"adactl.runtime.engine", "adactl.runtime.models", "transformers"} <= loaded


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("runtime", ("adactl.controllers", "adactl.envs", "adactl.bench", "adactl.server", "adactl.estimators")),
        ("estimators", ("adactl.controllers", "adactl.envs", "adactl.bench", "adactl.server")),
        ("envs", ("adactl.bench", "adactl.server")),
        ("adactl/controllers", ("adactl.envs", "adactl.bench", "adactl.server")),
    ],
)
def test_lower_layers_import_nothing_above_them(package, forbidden):
    """Checked in the source, function bodies included (where a hidden cycle would sit)."""
    bad = {
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for name in _imports(path)
        if name.startswith(forbidden)
    }
    assert not bad, sorted(bad)


def test_the_runtime_modules_import_no_cycle():
    """Issue 31: a step's modules read top-down (engine -> draft, target -> steps -> types ->
    stream -> errors); no two runtime modules import each other, even in function bodies."""
    modules = {p.stem: p for p in (REPO / "runtime").glob("*.py") if p.stem != "__init__"}
    graph = {
        name: {
            node.module.split(".")[0]
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        }
        & set(modules)
        for name, path in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
