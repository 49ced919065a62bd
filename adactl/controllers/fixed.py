"""Fixed draft length: standard speculative decoding (k) and plain decoding (k = 0).

draft_len_i = k for every running request i
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from adactl.interface import Controller, ScheduleState
from adactl.runtime.types import StepPlan


class FixedDraftLength(Controller):
    def __init__(self, k: int) -> None:
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        self.k = k

    @property
    def name(self) -> str:
        return f"fixed-k{self.k}"

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        return replace(state.plan, draft_len=min(self.k, state.max_draft_len))


class NoSpeculation(FixedDraftLength):
    def __init__(self) -> None:
        super().__init__(0)

    @property
    def name(self) -> str:
        return "no-speculation"
