"""TTFT-bounded chunked-prefill budget (the adaptive-allocation poster), made exact.

Waiting request j has r_j prompt tokens still to compute, a first-token deadline a_j (its
TTFT target) and a first-unit deadline b_j (the same for token readers; a word or sentence
reader's first unit is due one unit period later and needs u_j more decode steps after the
first token: tokens-per-unit minus one). With n prompt tokens per step and steps of T(n)
seconds (the step-time model on this step's decode rows plus n prefill tokens), request j
has s_j = min(floor(safety * (a_j - now) / T(n)), floor(safety * (b_j - now) / T(n)) - u_j)
steps for its prompt, and all of them are in time iff, in order of s_j, for every prefix j
(DESIGN.md section 5)

    r_1 + ... + r_j  <=  n * s_j

`safety` (0.8) leaves room for the step-time model's error.
The budget is the smallest n on a ladder (min_budget, 2 min_budget, ..., max_budget) that
passes and whose cost to decodes per prompt token, c(n) = (T(n) - T(0)) / n, is within
`cost_slack` (25%) of the cheapest passing n. In an engine that fuses prefill chunks into the
decode forward (vLLM) c(n) is flat and this is the poster's smallest feasible budget; in one
that runs each chunk as its own forward (ours: about 70 ms per chunk on the CPU, then 2 ms
per token) tiny chunks would multiply that fixed cost, and the rule stops at the size where
it is amortised. When no n passes (a deadline is already lost), max_budget, to catch up
fastest. Requests without a deadline add no constraint.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from adactl.estimators.step_time import StepShape, StepTimePredictor
from adactl.interface import Controller, ScheduleState
from adactl.runtime.shapes import context_of
from adactl.runtime.types import RequestView, StepPlan

from .stream_common import first_token_deadline, first_unit_deadline


def first_unit_steps(view: RequestView) -> int:
    """Decode steps after the first token before a request's first unit is complete."""
    if view.stream is None or view.stream.unit == "token":
        return 0
    per_unit = view.stream_progress.tokens_per_unit if view.stream_progress is not None else 1.3
    return max(0, math.ceil(per_unit) - 1)


class TTFTPrefillBudget(Controller):
    name = "ttft-budget"

    def __init__(self, step_time: StepTimePredictor, max_budget: int = 512, min_budget: int = 16,
                 safety: float = 0.8, cost_slack: float = 0.25) -> None:  # fmt: skip
        if not 1 <= min_budget <= max_budget:
            raise ValueError(f"need 1 <= min_budget <= max_budget, got {min_budget}, {max_budget}")
        self.step_time, self.max_budget, self.min_budget = step_time, max_budget, min_budget
        self.safety, self.cost_slack = safety, cost_slack
        ladder, n = [], min_budget
        while n < max_budget:
            ladder.append(n)
            n *= 2
        self.ladder = [*ladder, max_budget]

    def budget(self, state: ScheduleState) -> int:
        admitted = None if state.plan.admit is None else set(state.plan.admit)
        waiting = [v for v in state.waiting if admitted is None or v.request_id in admitted]
        if not waiting:
            return self.min_budget
        running = [v for v in state.running if state.plan.run is None or v.request_id in state.plan.run]
        rows, (context, span) = len(running), context_of([v.context_len for v in running])
        shapes = [StepShape(rows, rows, 1 if rows else 0, 0, 0, n, context, span_tokens=span)
                  for n in [0, *self.ladder]]  # fmt: skip
        decode, *seconds = (float(t) for t in self.step_time.predict(shapes))
        timed = [v for v in waiting if not math.isinf(first_unit_deadline(v))]
        feasible = []
        for n, t in zip(self.ladder, seconds):
            period = self.safety / max(float(t), 1e-6)
            steps = [
                min(math.floor((first_token_deadline(v) - state.now) * period),
                    math.floor((first_unit_deadline(v) - state.now) * period) - first_unit_steps(v))
                for v in timed
            ]  # fmt: skip
            need = 0
            for s, v in sorted(zip(steps, timed), key=lambda x: x[0]):
                need += v.prompt_len - v.prefilled
                if need > n * s:
                    break
            else:
                feasible.append((n, max(t - decode, 0.0) / n))
        if not feasible:
            return self.max_budget
        cheapest = min(c for _, c in feasible)
        return next(n for n, c in feasible if c <= (1 + self.cost_slack) * cheapest)

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        return replace(state.plan, prefill_budget=self.budget(state))
