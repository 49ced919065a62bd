# One-command entry points (the README's first lines). `make setup` installs everything:
# torch pinned to 2.13.0 only when no torch is present (GPU users keep theirs; an unpinned
# torch would pull several GB of CUDA packages), then adactl with its test tools.
PYTHON ?= python3
DEVICE ?= auto
DTYPE ?= float32

.PHONY: setup bench test test-floor lint gpu-check
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"

bench: setup
	$(PYTHON) -m adactl.cli bench spec --device $(DEVICE) --dtype $(DTYPE)

test: setup
	$(PYTHON) -m pytest
	$(MAKE) test-floor

# The engine and KV-cache tests again on the oldest transformers our pin allows (5.0.0), in a
# venv over this one's packages (the cache API changed within 5.x: `cache=`, mask sizes).
FLOOR_VENV ?= .venv-floor
test-floor:
	@test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet "transformers==5.0.0"
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" tests/test_kv.py tests/test_verify.py \
		tests/test_feature_draft.py tests/test_engine_greedy.py tests/test_engine_graphs.py \
		tests/test_engine_trees.py tests/test_engine_batching.py \
		tests/test_bench.py::test_bench_step_bare_forward_is_the_models_own_forward

lint: setup
	$(PYTHON) -m ruff check adactl runtime estimators envs tests
	$(PYTHON) -m mypy

# On a machine with an NVIDIA GPU (under 8 minutes on one H100): the CUDA tests (tiny random
# models, nothing to download) and the main bench's quick grid on the GPU.
gpu-check: setup
	$(PYTHON) -m pytest -m gpu -q tests/test_gpu.py
	$(PYTHON) -m adactl.cli bench step --device cuda --dtype bfloat16 --out bench_results/gpu_step
	$(PYTHON) -m adactl.cli bench spec --quick --rounds 3 --device cuda --dtype $(DTYPE) --out bench_results/gpu
