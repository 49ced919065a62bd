"""TTFT-bounded chunked-prefill budget (the adaptive-allocation poster), made exact.

Waiting requests in first-unit deadline order d_1 <= d_2 <= ..., request j with r_j prompt
tokens still to compute. With n prompt tokens per step and steps of T(n) seconds (the
step-time model on this step's decode rows plus n prefill tokens), all of them get their
first token in time iff, for every prefix j of that order (DESIGN.md section 5),

    r_1 + ... + r_j  <=  n * (floor(safety * (d_j - now) / T(n)) - u_j)

where u_j is the decode steps the first unit needs after the first token (0 for token
units; a word or sentence needs its tokens-per-unit minus one more), and `safety` (0.8)
leaves room for the step-time model's error.
The budget is the smallest n on a ladder (min_budget, 2 min_budget, ..., max_budget) that
passes, so the rest of each step goes to decodes; when none passes (a deadline is already
lost), max_budget, to catch up fastest. Requests without a deadline add no constraint.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from adactl.estimators.step_time import StepShape, StepTimePredictor
from adactl.interface import Controller, ScheduleState
from adactl.runtime.types import RequestView, StepPlan

from .stream_common import ttft_deadline


def first_unit_steps(view: RequestView) -> int:
    """Decode steps after the first token before a request's first unit is complete."""
    if view.stream is None or view.stream.unit == "token":
        return 0
    per_unit = view.stream_progress.tokens_per_unit if view.stream_progress is not None else 1.3
    return max(0, math.ceil(per_unit) - 1)


class TTFTPrefillBudget(Controller):
    name = "ttft-budget"

    def __init__(self, step_time: StepTimePredictor, max_budget: int = 512, min_budget: int = 16,
                 safety: float = 0.8) -> None:  # fmt: skip
        if not 1 <= min_budget <= max_budget:
            raise ValueError(f"need 1 <= min_budget <= max_budget, got {min_budget}, {max_budget}")
        self.step_time, self.max_budget, self.min_budget = step_time, max_budget, min_budget
        self.safety = safety
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
        order = sorted(waiting, key=ttft_deadline)
        running = [v for v in state.running if state.plan.run is None or v.request_id in state.plan.run]
        rows, context = len(running), sum(v.context_len for v in running)
        shapes = [StepShape(rows, rows, 1 if rows else 0, 0, 0, n, context) for n in self.ladder]
        seconds = self.step_time.predict(shapes)
        for n, t in zip(self.ladder, seconds):
            need, ok = 0, True
            for v in order:
                need += v.prompt_len - v.prefilled
                deadline = ttft_deadline(v)
                if math.isinf(deadline):
                    continue
                # the first unit needs units_after_first more decode steps once the prompt is in
                steps = math.floor(self.safety * (deadline - state.now) / max(float(t), 1e-6)) - first_unit_steps(v)
                if need > n * steps:
                    ok = False
                    break
            if ok:
                return n
        return self.max_budget

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        return replace(state.plan, prefill_budget=self.budget(state))
