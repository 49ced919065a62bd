"""`goodput`'s whole decision (`GoodputLength.act`) on a measured profile, batch 2 and 16, with
nothing waiting (the run-end rule) and with a request waiting (the throughput rule); mean of
300 after 50 warm-up. "still": the same state every time, as through a stretch without
drafting (the acceptance estimate does not move, so the run-end rule's kept table serves);
"moving": a new acceptance estimate every decision, as while drafting, or in `make bench`,
where every run of a round teaches the shared estimate (the kept table never serves there).

    PYTHONPATH=. python docs/issue30/drain/act_time.py docs/issue30/make_bench_run53/profile.json
"""

import sys
import time

import numpy as np
import torch

from adactl.controllers import GoodputLength
from adactl.estimators import MovingAverage
from adactl.estimators.step_cost import StepCostProfile
from adactl.interface import ScheduleState
from adactl.runtime import RequestView, SamplingParams

model = StepCostProfile.load(sys.argv[1]).model()
ma = MovingAverage(prior=0.5)
controller = GoodputLength(model, ma)
sampling = SamplingParams(max_new_tokens=64)
rng = np.random.default_rng(0)
for rows, waiting in ((2, False), (2, True), (16, False), (16, True)):
    running = tuple(RequestView(f"r{i}", "running", 100, 100, 4, 104, 0.0, 0.1, sampling) for i in range(rows))
    queued = (RequestView("w", "waiting", 100, 0, 0, 100, 0.0, None, sampling),) if waiting else ()
    state = ScheduleState(1.0, (*queued, *running), max_draft_len=4)
    still = ma.estimate(state)
    moving = [ma.estimate(state) for _ in range(350)]
    for estimate in moving:  # each its own acceptance, near the still one
        shake = rng.uniform(0.97, 1.0, estimate.alpha.shape[-1])
        estimate.alpha.mul_(torch.as_tensor(shake, dtype=estimate.alpha.dtype))
    rule = "throughput" if waiting else "run-end"
    for name, estimates in (("still", [still] * 350), ("moving", moving)):
        for estimate in estimates[:50]:
            controller.act(state, estimate)
        t = time.perf_counter()
        for estimate in estimates[50:]:
            controller.act(state, estimate)
        print(f"batch {rows}, {rule} rule, estimate {name}: {(time.perf_counter() - t) / 300 * 1e3:.3f} ms a decision")
