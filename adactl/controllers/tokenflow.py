"""A TokenFlow-like scheduler: buffer priority plus offload (TokenFlow, arXiv 2510.02758).

    admit   = waiting requests in arrival order (no servability test) while max_num_seqs
              allows and their prompt's blocks can be had: free ones, or freed by moving the
              running streams with the largest buffers off the device (host memory where the
              server has it, else recompute; `MemoryLever`, the rule ProgressServe's memory
              lever uses)
    run     = every running request
    restore = streams moved off, least slack first, once their slack is down to the way back
              plus a lead, or while memory is free beyond what the queue needs

It is ProgressServe's memory lever without ProgressServe's deadline-risk admission and
deferral: beside it, it shows what each of the two contributes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from adactl.estimators.step_time import StepTimePredictor
from adactl.interface import Controller, ScheduleState
from adactl.runtime.types import StepPlan

from .stream_common import MemoryLever, moved_off


class BufferOffload(Controller):
    name = "tokenflow"

    def __init__(self, step_time: StepTimePredictor, max_num_seqs: int | None = None, prefill_budget: int = 512,
                 lead: float = 1.0) -> None:  # fmt: skip
        self.step_time, self.max_num_seqs = step_time, max_num_seqs
        self.prefill_budget, self.lead = prefill_budget, lead

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        lever = MemoryLever(self.step_time, state, self.lead, self.prefill_budget) if state.kv is not None else None
        waiting = sorted((v for v in state.waiting if not moved_off(v) and v.status != "restoring"),
                         key=lambda v: (v.status != "prefilling", v.arrival_time))  # fmt: skip
        admit = [v.request_id for v in waiting if v.status == "prefilling"]
        in_flight = len(state.running) + len(admit)
        queued = [v for v in waiting if v.status != "prefilling"]
        for v in queued:
            if self.max_num_seqs is not None and in_flight >= self.max_num_seqs:
                break
            if lever is not None and not lever.make_room(v):
                break  # first come, first served: nothing overtakes it
            admit.append(v.request_id)
            in_flight += 1
        if lever is None:
            return replace(state.plan, admit=admit, run=None, prefill_budget=self.prefill_budget)
        moves = lever.moves(waiting_blocks=sum(lever.need(v) for v in queued if v.request_id not in admit))
        readmit = moves.pop("readmit")
        return replace(state.plan, admit=[*readmit, *admit], run=None, prefill_budget=self.prefill_budget, **moves)
