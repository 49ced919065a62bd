# One-command entry points (the README's first lines). `make setup` installs everything:
# torch pinned to 2.13.0 only when no torch is present (GPU users keep theirs; an unpinned
# torch would pull several GB of CUDA packages), then adactl with its test tools.
PYTHON ?= python3
DEVICE ?= auto
# auto: bfloat16 on CUDA, float32 elsewhere
DTYPE ?= auto
# more flags for `make bench`, e.g. BENCH_FLAGS=--resume to go on with a stopped run
BENCH_FLAGS ?=

.PHONY: setup bench test test-floor lint gpu-check
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"

bench: setup
	$(PYTHON) -m adactl.cli bench spec --device $(DEVICE) --dtype $(DTYPE) $(BENCH_FLAGS)

test: setup
	$(PYTHON) -m pytest
	$(MAKE) test-floor

# The engine and KV-cache tests again on the oldest transformers our pin allows (5.0.0), on this
# interpreter with transformers 5.0.0 and what it needs put first on PYTHONPATH (tests/floor.py).
test-floor:
	$(PYTHON) -m tests.floor

lint: setup
	$(PYTHON) -m ruff check adactl runtime estimators envs tests
	$(PYTHON) -m mypy

# On a machine with an NVIDIA GPU (under 8 minutes on one H100): the CUDA tests (tiny random
# models, nothing to download) and the main bench's quick grid on the GPU.
gpu-check: setup
	$(PYTHON) -m pytest -m gpu -q tests/test_gpu.py
	$(PYTHON) -m adactl.cli bench step --device cuda --dtype bfloat16 --out bench_results/gpu_step
	$(PYTHON) -m adactl.cli bench spec --quick --rounds 3 --device cuda --dtype $(DTYPE) --out bench_results/gpu
