"""`goodput`'s whole decision (`GoodputLength.act`) on a measured profile, batch 2 and 16, with
nothing waiting (the run-end rule) and with a request waiting (the throughput rule); the same
state every time, as through a stretch without drafting; mean of 300 after 50 warm-up.

    PYTHONPATH=. python docs/issue30/drain/act_time.py docs/issue30/make_bench_run53/profile.json
"""

import sys
import time

from adactl.controllers import GoodputLength
from adactl.estimators import MovingAverage
from adactl.estimators.step_cost import StepCostProfile
from adactl.interface import ScheduleState
from adactl.runtime import RequestView, SamplingParams

model = StepCostProfile.load(sys.argv[1]).model()
ma = MovingAverage(prior=0.5)
controller = GoodputLength(model, ma)
sampling = SamplingParams(max_new_tokens=64)
for rows, waiting in ((2, False), (2, True), (16, False), (16, True)):
    running = tuple(RequestView(f"r{i}", "running", 100, 100, 4, 104, 0.0, 0.1, sampling) for i in range(rows))
    queued = (RequestView("w", "waiting", 100, 0, 0, 100, 0.0, None, sampling),) if waiting else ()
    state = ScheduleState(1.0, (*queued, *running), max_draft_len=4)
    estimate = ma.estimate(state)
    for _ in range(50):
        controller.act(state, estimate)
    t = time.perf_counter()
    for _ in range(300):
        controller.act(state, estimate)
    rule = "throughput" if waiting else "run-end"
    print(f"batch {rows}, {rule} rule: {(time.perf_counter() - t) / 300 * 1e3:.3f} ms a decision")
