# One-command entry points (the README's first lines). `make setup` installs everything:
# torch pinned to 2.13.0 only when no torch is present (GPU users keep theirs; an unpinned
# torch would pull several GB of CUDA packages), then adactl with its test tools.
PYTHON ?= python3

.PHONY: setup bench test lint
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"

bench: setup
	$(PYTHON) -m adactl.cli bench spec

test: setup
	$(PYTHON) -m pytest

lint: setup
	$(PYTHON) -m ruff check adactl runtime estimators envs tests
	$(PYTHON) -m mypy
