"""Installing adactl as a user does: the dependencies it imports are declared, a non-editable
install carries the shipped models, and an environment built from `pyproject.toml` alone
imports every module of the package.

The environments are made from the running interpreter (a system Python, a venv or a conda
environment: `tests/child_env.py`); one that cannot be made fails the test with the reason."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.child_env import REGISTRY_HINT, REPO, EnvSetupError, build_wheel, make_venv, pip

LIBRARY = ("adactl", "runtime", "estimators", "envs", "models")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, set[str]]:
    """pyproject.toml's requirements by table: "dependencies" and each extra, as normalised
    distribution names."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.10 has no tomllib to read pyproject.toml")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    tables = {"dependencies": project["dependencies"], **project.get("optional-dependencies", {})}
    return {k: {_normalise(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in v} for k, v in tables.items()}  # type: ignore[union-attr]


def imported_modules(folders: tuple[str, ...]) -> dict[str, str]:
    """Top-level names of the third-party modules the code in `folders` imports (at module level
    or inside functions), each with one file that imports it."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "adactl":
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared() -> None:
    """Every package the library imports is in [project.dependencies] (not inherited from
    another package's requirements, which change under us: fastapi's own brought
    opentelemetry-api in); the train/ scripts may also use the extras, tests the dev extra."""
    tables = declared()
    owners = packages_distributions()
    extras = set().union(*(v for k, v in tables.items() if k != "dev"))
    for folders, allowed in ((LIBRARY, tables["dependencies"]), (("train",), extras),
                             (("tests",), tables["dependencies"] | tables["dev"])):  # fmt: skip
        missing = {}
        for module, path in imported_modules(folders).items():
            if module == "tests":
                continue
            # a module not installed here (an extra: ray) is taken to come from its namesake
            dists = {_normalise(d) for d in owners.get(module, [])} or {_normalise(module)}
            if not dists & allowed:
                missing[module] = (path, sorted(dists))
        assert not missing, f"imported by {folders} but not declared in pyproject.toml: {missing}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_wheel(tmp_path_factory.mktemp("wheel"))
    except EnvSetupError as e:
        pytest.fail(str(e), pytrace=False)


def _run(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=900, cwd=cwd)


LOADS_THE_DRAFT = """
import sys
from pathlib import Path
import adactl
from adactl.runtime.models import SHIPPED_MODELS, load_draft, load_model
from adactl.estimators.step_cost import StepCostProfile
here = Path(adactl.__file__).resolve()
assert sys.prefix in str(here), (here, sys.prefix)          # the installed copy, not the checkout
assert str(SHIPPED_MODELS).startswith(sys.prefix), SHIPPED_MODELS
for f in sorted((SHIPPED_MODELS / "estimators").glob("step_cost_*.json")):
    StepCostProfile.load(f)
gpu = sorted((SHIPPED_MODELS / "estimators").glob("gpu_*.json"))
assert len(gpu) == 4, gpu                                     # the computed GPU profiles
for f in gpu:
    StepCostProfile.load(f)
from adactl.runtime.traces import AcceptanceTraces, shipped_traces, shipped_traces_path
for workload in ("sharegpt", "humaneval"):                   # the acceptance traces the replay draws from
    for temperature in (0.0, 0.7):
        assert len(AcceptanceTraces.load(shipped_traces_path(workload, temperature))) > 0
    assert shipped_traces(workload).tree_width == 2              # with their token-tree traces
    assert shipped_traces(workload, tree_width=4).tree_width == 4  # and the width-4 ones
draft = load_draft("draft", load_model("smollm2"))
print("draft", type(draft).__name__, sum(p.numel() for p in draft.parameters() if p.requires_grad))
"""


@pytest.mark.slow
@pytest.mark.install
def test_pip_install_without_editable_loads_the_default_draft(wheel: Path, tmp_path: Path) -> None:
    """On top of this environment's packages (the same torch and transformers), the installed
    wheel, not the checkout, is what loads, with the shipped models inside it."""
    try:
        python = make_venv(tmp_path / "venv", inherit=True)
        pip(["install", "--quiet", "--no-deps", str(wheel)], "install adactl's wheel", REGISTRY_HINT, python)
    except EnvSetupError as e:
        pytest.fail(str(e), pytrace=False)
    run = _run(python, LOADS_THE_DRAFT, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("draft FeatureDraft")


IMPORTS_EVERY_MODULE = """
import importlib, pkgutil, subprocess, sys
import adactl
assert adactl.__file__.startswith(sys.prefix), adactl.__file__
names = sorted(m.name for m in pkgutil.walk_packages(adactl.__path__, "adactl.") if not m.name.endswith("__main__"))
for name in names:
    importlib.import_module(name)
help = subprocess.run([sys.prefix + "/bin/adactl", "--help"], capture_output=True, text=True)
assert help.returncode == 0 and "bench" in help.stdout, help.stderr
print(len(names), "modules")
"""


def torch_pin() -> str:
    """The running torch, so that the fresh environment gets the same build (an unpinned torch
    would be a CUDA build of several GB on a CPU machine)."""
    import torch

    return f"torch=={torch.__version__}"


@pytest.mark.slow
@pytest.mark.install
def test_an_environment_from_pyproject_alone_imports_every_module(wheel: Path, tmp_path: Path) -> None:
    """A new, empty environment with nothing but `pip install adactl` (its declared
    dependencies, resolved by pip; torch pinned to the running one) imports every module of
    the package and runs the console script: no dependency is only inherited."""
    try:
        python = make_venv(tmp_path / "venv", inherit=False)
        pip(["install", "--quiet", str(wheel), torch_pin()], "install adactl with its dependencies",
            REGISTRY_HINT, python)  # fmt: skip
    except EnvSetupError as e:
        pytest.fail(str(e), pytrace=False)
    run = _run(python, IMPORTS_EVERY_MODULE, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    modules = [p for folder in LIBRARY for p in (REPO / folder).rglob("*.py")]
    assert int(run.stdout.split()[0]) == len(modules) - 1  # every module of the checkout, but adactl itself
