"""Deadline first (EDF / least slack): the streaming baseline that orders by deadline.

admit = waiting requests by first-unit deadline while in-flight <= max_num_seqs
run   = the max_running running requests with the least slack, where
        slack_i = next_due_i - now + buffer_i / rate_i   (seconds until its reader runs dry)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from adactl.interface import Controller, ScheduleState
from adactl.runtime.types import StepPlan

from .stream_common import admit_in_order, first_unit_deadline, in_flight, slack


class DeadlineFirst(Controller):
    def __init__(self, max_running: int | None = None, max_num_seqs: int | None = None,
                 prefill_budget: int = 512) -> None:  # fmt: skip
        self.max_running, self.max_num_seqs, self.prefill_budget = max_running, max_num_seqs, prefill_budget

    @property
    def name(self) -> str:
        return f"edf(run={self.max_running},seqs={self.max_num_seqs})"

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        deadline = {v.request_id: first_unit_deadline(v) for v in state.waiting}
        admit = sorted(admit_in_order(state.waiting, in_flight(state), self.max_num_seqs), key=deadline.__getitem__)
        running = sorted(state.running, key=lambda v: slack(v, state.now))
        run = [v.request_id for v in running[: self.max_running]] if self.max_running is not None else None
        return replace(state.plan, admit=admit, run=run, prefill_budget=self.prefill_budget)
