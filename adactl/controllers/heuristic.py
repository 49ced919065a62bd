"""transformers' "heuristic" schedule of assisted generation, per request.

    k_i <- k_i + 2   if every token request i drafted last step was accepted
    k_i <- max(1, k_i - 1)   otherwise

starting from `initial` (transformers starts at `num_assistant_tokens`; it serves batch 1
only, so here each request keeps its own k). Pair it with `ConfidenceStop` for the
0.4 draft-confidence stop transformers also applies.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from adactl.interface import Controller, ScheduleState, StepRecord
from adactl.runtime.types import StepPlan


class HeuristicSchedule(Controller):
    name = "heuristic"

    def __init__(self, initial: int = 4, max_len: int = 8) -> None:
        self.initial, self.max_len = initial, max_len
        self.k: dict[str, int] = {}

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        cap = min(self.max_len, state.max_draft_len)
        lens = {r.request_id: min(self.k.get(r.request_id, self.initial), cap) for r in state.running}
        return replace(state.plan, draft_len=lens)

    def update(self, record: StepRecord) -> None:
        o = record.outcome
        for rid, drafted, accepted in zip(o.request_ids, o.drafted.tolist(), o.accepted.tolist()):
            if drafted == 0:
                continue
            k = self.k.get(rid, self.initial)
            self.k[rid] = min(k + 2, self.max_len) if accepted == drafted else max(1, k - 1)
        for rid in o.finished:
            self.k.pop(rid, None)
