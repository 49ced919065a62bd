"""Step-cost prediction throughput: StepCostModel.predict on N shapes (a profile + online surface).

    python docs/issue30/decision_time/pred.py docs/issue30/make_bench_run36/profile.json [OUT.npy]

OUT.npy keeps 500 predictions, to compare two versions' numbers."""
import sys, time
import numpy as np
from adactl.estimators.step_cost import StepCostProfile
from adactl.controllers.goodput import chain_step
from adactl.runtime.shapes import StepShape

model = StepCostProfile.load(sys.argv[1]).model(refine=True)
rng = np.random.default_rng(0)
for i in range(60):
    b = int(2 ** rng.integers(0, 7)); c = int(rng.integers(0, 4))
    model.observe(chain_step(b, c, 300 * b), (0.0, 0.004 * c, 0.03 + 0.001 * b * (c + 1)))
def shapes(n):
    out = []
    for i in range(n):
        b = int(rng.integers(1, 80)); c = int(rng.integers(0, 7))
        out.append(chain_step(b, c, 250 * b, int(rng.integers(0, 2)) * 64))
    return out
res = {}
for n in (1, 9, 100, 400):
    s = shapes(n)
    for _ in range(5): model.predict(s)
    reps = max(20, 2000 // n)
    t = time.perf_counter()
    for _ in range(reps): p = model.predict(s)
    res[n] = 1e3 * (time.perf_counter() - t) / reps
    print(f"predict N={n:4d}: {res[n]:.3f} ms  ({1e3*res[n]/n:.1f} us/shape)")
np.save(sys.argv[2], model.predict(shapes(500))) if len(sys.argv) > 2 else None
