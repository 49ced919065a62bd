"""Step-cost prediction throughput: StepCostModel.predict on N shapes (a profile + online surface).

    python docs/issue30/decision_time/pred.py docs/issue30/make_bench_run36/profile.json [OUT.npy]

OUT.npy keeps 500 predictions, to compare two versions' numbers.
"""

import sys
import time

import numpy as np

from adactl.controllers.goodput import chain_step
from adactl.estimators.step_cost import StepCostProfile


def shapes(rng: np.random.Generator, n: int) -> list:
    """Chain steps of 1-79 rows, draft length 0-6, half of them with a 64-token prefill chunk."""
    out = []
    for _ in range(n):
        b, c = int(rng.integers(1, 80)), int(rng.integers(0, 7))
        out.append(chain_step(b, c, 250 * b, int(rng.integers(0, 2)) * 64))
    return out


def main(profile: str, out: str | None = None) -> None:
    model = StepCostProfile.load(profile).model(refine=True)
    rng = np.random.default_rng(0)
    for _ in range(60):  # an online surface that has seen steps, as in a run
        b, c = int(2 ** rng.integers(0, 7)), int(rng.integers(0, 4))
        model.observe(chain_step(b, c, 300 * b), (0.0, 0.004 * c, 0.03 + 0.001 * b * (c + 1)))
    for n in (1, 9, 100, 400):
        some = shapes(rng, n)
        for _ in range(5):
            model.predict(some)
        reps = max(20, 2000 // n)
        start = time.perf_counter()
        for _ in range(reps):
            model.predict(some)
        ms = 1e3 * (time.perf_counter() - start) / reps
        print(f"predict N={n:4d}: {ms:.3f} ms  ({1e3 * ms / n:.1f} us/shape)")
    if out:
        np.save(out, model.predict(shapes(rng, 500)))


if __name__ == "__main__":
    main(*sys.argv[1:])
