"""Second Python environments for the tests that need one, made from the *running* interpreter
whatever it is (a system Python, a venv, a conda environment):

- `make_venv(path, inherit=True)`: a venv whose site-packages are its own first, then the
  running interpreter's (a `.pth` file of plain paths: their own `.pth` files, such as an
  editable install's finder, are not run, so a package installed into the child is the copy
  that loads). `venv`'s own `system_site_packages=True` would give the *base* interpreter's
  packages instead, which inside a venv are none of the ones installed.
- `make_venv(path, inherit=False)`: an empty one, for an install from `pyproject.toml` alone.
- `pip(...)`: the running interpreter's pip, pointed at a child with `--python`, so the child
  needs no pip of its own.
- `overlay(...)`: the packages a requirement needs beyond what is installed here, resolved by
  pip against this environment and installed with `--target` into a folder to put first on
  `PYTHONPATH` (how `make test-floor` runs the engine tests on the oldest transformers).

Whatever cannot be set up raises `EnvSetupError` with one line naming what is missing and how
to get it; the tests turn it into a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class EnvSetupError(RuntimeError):
    """A child environment could not be made; the message says what is missing and what to do."""


def site_dirs() -> list[str]:
    """The running interpreter's package folders, in its own order (a venv's, then the system's
    when the venv includes them; a conda environment's; the user site)."""
    dirs = [p for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    return list(dict.fromkeys(dirs))


def make_venv(path: Path, inherit: bool) -> Path:
    """A new venv at `path`; returns its python. inherit: see the module docstring."""
    try:
        venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt", clear=True).create(path)
    except Exception as e:  # e.g. Debian's python3 without its venv package
        hint = "install Python's venv module (Debian/Ubuntu: apt install python3-venv)"
        raise EnvSetupError(f"cannot make a virtual environment at {path} ({type(e).__name__}: {e}); {hint}") from e
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if inherit:
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        Path(purelib, "_parent_site.pth").write_text("".join(d + "\n" for d in site_dirs()))
    return python


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    return " | ".join(lines[-n:]) or "(no output)"


def pip(args: list[str], what: str, hint: str, python: Path | None = None, timeout: float = 1800) -> str:
    """Runs this interpreter's pip (`--python child` when given); stdout. On failure raises
    `EnvSetupError("could not {what}: {pip's last lines}; {hint}")`."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        raise EnvSetupError(f"could not {what}: this interpreter ({sys.executable}) has no pip; "
                            f"install it with {sys.executable} -m ensurepip")  # fmt: skip
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    cmd += ["--python", str(python)] if python is not None else []
    done = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise EnvSetupError(f"could not {what}: pip says: {_last_lines(done.stderr + done.stdout)}; {hint}")
    return done.stdout


REGISTRY_HINT = "it needs the package registry (PyPI) reachable, or the packages in pip's cache"


def build_backend_present() -> bool:
    """Is the build backend pyproject.toml asks for (setuptools with its own bdist_wheel)
    importable here, so that a wheel builds without fetching one?"""
    import importlib.util

    try:
        return importlib.util.find_spec("setuptools.command.bdist_wheel") is not None  # setuptools >= 70.1
    except ImportError:  # no setuptools at all
        return False


def build_wheel(out: Path) -> Path:
    """adactl's wheel, built by this interpreter's pip: with the build backend installed here
    when it is, else with build isolation (setuptools from the package registry)."""
    import shutil

    # from a copy: setuptools builds in the source tree, and a stale build/ there would be packaged
    source = out / "source"
    skip = (
        ".git",
        "build",
        "dist",
        "*.egg-info",
        "__pycache__",
        ".floor",
        ".venv*",
        "runs",
        "bench_results",
        ".*_cache",
    )
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*skip))
    isolation = ["--no-build-isolation"] if build_backend_present() else []
    pip(["wheel", "--quiet", "--no-deps", *isolation, "-w", str(out), str(source)],
        "build adactl's wheel",
        "with no setuptools >= 70.1 installed here, the build fetches it from the package registry: "
        f"make it reachable, or {sys.executable} -m pip install 'setuptools>=70.1'")  # fmt: skip
    (wheel,) = out.glob("adactl-*.whl")
    return wheel


def overlay(requirement: str | list[str], root: Path) -> Path:
    """A folder with `requirement` (one, or several resolved together) and whatever it needs
    that this environment lacks or has in a version it does not accept, pinned as pip resolves
    them against this environment (a dry run), installed without dependencies; reused while
    the same pins are asked for."""
    wanted = [requirement] if isinstance(requirement, str) else list(requirement)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip(["install", "--dry-run", "--quiet", "--report", str(report), *wanted],
            f"resolve {' '.join(wanted)} against {sys.prefix}", REGISTRY_HINT)  # fmt: skip
        pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.loads(report.read_text())
                      ["install"])  # fmt: skip
    import hashlib

    folder = root / hashlib.sha256(" ".join([sys.version, *pins]).encode()).hexdigest()[:12]
    if (folder / ".complete").exists():
        return folder
    pip(["install", "--quiet", "--no-deps", "--upgrade", "--target", str(folder), *pins],
        f"install {', '.join(pins)} into {folder}", REGISTRY_HINT)  # fmt: skip
    (folder / ".complete").write_text("\n".join(pins) + "\n")
    return folder
