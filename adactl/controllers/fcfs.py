"""First come, first served, as vLLM schedules: the streaming baseline.

    admit = waiting requests in arrival order while in-flight <= max_num_seqs
    run   = every running request, every step (decode first)
    prefill budget = a static token count per step (chunked prefill)

Both knobs are what a vLLM operator tunes (`max_num_seqs`, `max_num_batched_tokens`); the
streaming benchmark reports the best tuned pair, not only the defaults.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from adactl.interface import Controller, ScheduleState
from adactl.runtime.types import StepPlan

from .stream_common import admit_in_order, in_flight


class FCFS(Controller):
    def __init__(self, max_num_seqs: int | None = None, prefill_budget: int = 512) -> None:
        if max_num_seqs is not None and max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1 or None, got {max_num_seqs}")
        if prefill_budget < 1:
            raise ValueError(f"prefill_budget must be >= 1, got {prefill_budget}")
        self.max_num_seqs, self.prefill_budget = max_num_seqs, prefill_budget

    @property
    def name(self) -> str:
        return f"fcfs(seqs={self.max_num_seqs},budget={self.prefill_budget})"

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        admit = admit_in_order(state.waiting, in_flight(state), self.max_num_seqs)
        return replace(state.plan, admit=admit, run=None, prefill_budget=self.prefill_budget)
