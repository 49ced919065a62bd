"""`make test-floor`: the engine and KV-cache tests again on the oldest transformers our pin
allows (5.0.0; the cache API changed within 5.x: `cache=`, mask sizes).

    python -m tests.floor [pytest options]

Runs on the running interpreter (a system Python, a venv, a conda environment), with
transformers 5.0.0 and whatever it needs that this environment lacks (huggingface-hub < 2,
tokenizers <= 0.23.0, a kernels its hub integration loads with, ...) installed with `pip
--target` into `.floor/<pins>/` and put first on `PYTHONPATH`; checked to be the
transformers that loads before any test runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.child_env import REPO, EnvSetupError, overlay

FLOOR = "transformers==5.0.0"
# transformers 5.0.0 builds `kernels.LayerRepository`s at import when `kernels` is installed
# (transformers 5.25 requires it); kernels >= 0.17 refuses them without a revision, so the
# floor brings the last kernels its hub integration loads with (0.14-0.16 need kernels_data)
WITH = ["kernels==0.12.3"]
TESTS = [
    "tests/test_kv.py", "tests/test_verify.py", "tests/test_feature_draft.py", "tests/test_engine_greedy.py",
    "tests/test_engine_graphs.py", "tests/test_engine_trees.py", "tests/test_engine_batching.py",
    "tests/test_bench.py::test_bench_step_bare_forward_is_the_models_own_forward",
]  # fmt: skip


def main(argv: list[str]) -> int:
    try:
        folder = overlay([FLOOR, *WITH], REPO / ".floor")
    except EnvSetupError as e:
        print(f"make test-floor: {e}", file=sys.stderr)
        return 1
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    version = FLOOR.split("==")[1]
    check = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, env=env, cwd=REPO)  # fmt: skip
    if check.stdout.strip() != version:
        print(f"make test-floor: transformers {version} does not load from {folder} "
              f"(got {check.stdout.strip() or check.stderr.strip().splitlines()[-1:]}); "
              f"delete {REPO / '.floor'} and rerun", file=sys.stderr)  # fmt: skip
        return 1
    print(f"make test-floor: transformers {version} from {folder.relative_to(REPO)}", flush=True)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", *TESTS, *argv],
                          env=env, cwd=REPO).returncode  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
