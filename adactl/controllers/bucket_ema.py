"""SGLang-style adaptive speculation: a moving average of accepted length per batch-size bucket.

For the bucket b of the current batch size (powers of two), keep
    L_b <- d * L_b + (1 - d) * mean accepted length of the step
and draft k = clip(round(L_b) + 1, 1, K) tokens: one more than the batch usually accepts,
so that a run of acceptances can still grow it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from adactl.interface import Controller, ScheduleState, StepRecord
from adactl.runtime.types import StepPlan


def bucket(batch: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(batch, 1))))


class BucketEMA(Controller):
    name = "bucket-ema"

    def __init__(self, initial: float = 2.0, decay: float = 0.9, max_len: int = 8) -> None:
        self.initial, self.decay, self.max_len = initial, decay, max_len
        self.length: dict[int, float] = {}

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        cap = min(self.max_len, state.max_draft_len)
        if cap == 0:
            return replace(state.plan, draft_len=0)
        level = self.length.get(bucket(len(state.running)), self.initial)
        return replace(state.plan, draft_len=max(1, min(cap, round(level) + 1)))

    def update(self, record: StepRecord) -> None:
        o = record.outcome
        drafted = o.drafted > 0
        if bool(drafted.any()):
            b = bucket(len(o.request_ids))
            mean = float(o.accepted[drafted].float().mean())
            self.length[b] = self.decay * self.length.get(b, self.initial) + (1 - self.decay) * mean
