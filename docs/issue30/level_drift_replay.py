"""The replay behind the online levels' drift (estimators/cost_surface.py): a server's phases
(tests/test_step_cost.py's, run by `serve_phase` here with the replay's step noise as a
parameter) on a replay whose truth is this machine's measured steps,
models/estimators/step_cost_cpu.json (`MeasuredMachine`), for several filter settings.
Reports the worst ratio error T(k) / T(0) after any phase, goodput's wrong choices, and the
mean one-step-ahead |log error| of the refined model.

    PYTHONPATH=. python docs/issue30/level_drift_replay.py   (from the repository root: it reads tests/)
"""

import math
from dataclasses import replace

import numpy as np
import torch

from adactl.estimators import MovingAverage
from adactl.estimators.cost_surface import ONLINE, CostSurface, Sigmas
from adactl.estimators.step_cost import StepCostModel
from adactl.loop import ControlLoop
from adactl.runtime import SamplingParams
from adactl.runtime.replay import ReplayEngine
from adactl.stacks import StackContext, build_stack
from tests import test_step_cost as t

GREEDY = [0.47, 0.48, 0.51, 0.48, 0.6, 0.51, 0.5, 0.5]
SAMPLED = [a * 0.75 for a in GREEDY]
PHASES = [(64, GREEDY, 1.0), (1, GREEDY, 1.0), (16, SAMPLED, 1.25), (4, SAMPLED, 1.25), (64, SAMPLED, 1.0),
          (16, GREEDY, 1.0), (1, SAMPLED, 1.0), (4, GREEDY, 1.0)]  # fmt: skip


class Recording(StepCostModel):
    """The step-cost model, noting each step's |log(measured / predicted)| before it learns."""

    errors: list[float]

    def observe(self, shape, seconds):  # type: ignore[no-untyped-def]
        self.errors.append(abs(math.log(float(np.sum(seconds)) / float(self.predict([shape])[0]))))
        super().observe(shape, seconds)


def serve_phase(cost, truth, batch, alpha, seed, drift, noise) -> None:  # type: ignore[no-untyped-def]
    for r, stack in enumerate(["no-spec", "fixed-k1", "goodput", "fixed-k2", "fixed-k4", "goodput"]):
        engine = ReplayEngine(t._Scaled(truth, drift), alpha=alpha, max_batch_size=batch, noise=noise, seed=seed + r)
        for _ in range(batch):
            engine.add_request(200, SamplingParams(max_new_tokens=32, stop_on_eos=False))
        built = build_stack(stack, StackContext(cost, lambda name: MovingAverage(prior=alpha[0])))
        ControlLoop(engine, built.schedule, max_draft_len=8, estimators=[cost], clock=engine.clock,
                    prefill_budget=200 * batch).run()  # fmt: skip


def run(sigmas: Sigmas, noise: float) -> tuple[float, int, float]:
    profile = t.shipped_cpu_profile()
    truth, base = t.MeasuredMachine(profile), profile.model()
    cost = Recording(base.theta, base.profile)
    cost.online, cost.errors = CostSurface(sigmas, level_memory=100, ratio_memory=400), []
    worst, wrong = 0.0, 0
    for i, (batch, alpha, drift) in enumerate(PHASES):
        serve_phase(cost, truth, batch, alpha, 100 * i, drift, noise)
        worst = max(worst, *t.ratio_errors(cost, truth, (1, 4, 16, 64), (1, 2, 4)).values())
        wrong += sum(len(t.wrong_choices(cost, truth, torch.tensor(a), (1, 4, 16, 64))) for a in (GREEDY, SAMPLED))
    return worst, wrong, float(np.mean(cost.errors))


if __name__ == "__main__":
    torch.set_num_threads(1)
    before = replace(ONLINE, noise=0.05, level_drift=None)  # the filter of commit 04c2bc7
    for noise in (0.05, 0.1):
        for name, sigmas in [("before", before), ("after (ONLINE)", ONLINE)]:
            worst, wrong, err = run(sigmas, noise)
            print(f"replay step noise {noise}: {name:15s} worst ratio error {worst:.1%}, wrong choices {wrong}, "
                  f"one-step |log error| {err:.3f}")
