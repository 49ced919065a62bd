"""A non-editable `pip install .` carries the shipped models: the default draft loads from the
installed package, not from a checkout."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHECK = """
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
draft = load_draft("draft", load_model("smollm2"))
print("draft", type(draft).__name__, sum(p.numel() for p in draft.parameters() if p.requires_grad))
"""


@pytest.mark.slow
@pytest.mark.install
def test_pip_install_without_editable_loads_the_default_draft(tmp_path: Path) -> None:
    env = tmp_path / "venv"
    # no pip or setuptools of its own: this machine's (and its dependencies) through the system site
    venv.create(env, system_site_packages=True, with_pip=False)
    python = env / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(REPO)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("draft FeatureDraft")
    assert sys.prefix != str(env)
