"""Andes-style priority: serve the requests whose delivery lags their reader's timeline most.

    lag_i = (units the reader expected by now: rate_i * (now - first-unit deadline_i) + 1)
            - (units generated)
    run   = the max_running running requests with the largest lag
    admit = waiting requests in arrival order while in-flight <= max_num_seqs

(Andes schedules by the QoE a request would gain; with a reader that consumes at a steady
rate, the gain is largest where delivery is furthest behind the expected timeline.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from adactl.interface import Controller, ScheduleState
from adactl.runtime.types import StepPlan

from .stream_common import admit_in_order, in_flight, lag


class AndesPriority(Controller):
    def __init__(self, max_running: int | None = None, max_num_seqs: int | None = None,
                 prefill_budget: int = 512) -> None:  # fmt: skip
        self.max_running, self.max_num_seqs, self.prefill_budget = max_running, max_num_seqs, prefill_budget

    @property
    def name(self) -> str:
        return f"andes(run={self.max_running},seqs={self.max_num_seqs})"

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        admit = admit_in_order(state.waiting, in_flight(state), self.max_num_seqs)
        running = sorted(state.running, key=lambda v: -lag(v, state.now))
        run = [v.request_id for v in running[: self.max_running]] if self.max_running is not None else None
        return replace(state.plan, admit=admit, run=run, prefill_budget=self.prefill_budget)
