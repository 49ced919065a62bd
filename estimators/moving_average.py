"""Per-position moving average of acceptance: the simple baseline (SmartSpec, SGLang).

alpha_j = an exponential moving average, over verify outcomes, of the acceptance of draft
position j given j - 1 was accepted; the same for every request. On token trees, position j
is tree level j: the chance the accepted path goes one level deeper (`level_labels`). It ignores the draft's
distributions, so it can also be asked before drafting (`alpha(k)`).

Memory: a step's n outcomes at position j move alpha_j by weight 1 - w, with
w = min(decay^n, c / (c + n)) and c = `strength` + the outcomes seen so far: a running mean
over the first outcomes, the prior counted as `strength` (25) of them, then an exponential
average over about 2 / (1 - decay) outcomes (400 at decay 0.995; standard deviation 0.025 at
alpha 0.45). Decay is per outcome, not per step: a batch of B rows gives B outcomes a step, so
at batch 8 the memory is about 50 steps. Why this long (measured, issue 30): with decay 0.98
(100 outcomes, 6-12 steps at batch 8) the batch's position-1 estimate swung 0.25-0.58 on the
default pair at temperature 0.7, and `goodput` drafted nothing on the steps where it dipped:
it accepted 1.34 tokens a row-step against fixed k = 1's 1.43 over ten seeds; with decay
0.995 and the running-mean start, 1.42 (`PYTHONPATH=.:docs/issue30/alone_replay python
docs/issue30/alone_replay/luck.py VARIANT --batch 8`, VARIANT "" or "decay0.98,inf"), with no
change at batch 1 and 4 and none beyond noise in the replay at batch 1-64, both temperatures
(`docs/issue30/alone_replay/README.md`). The running-mean start keeps the first outcomes'
pull as strong as the short memory's was, so a server whose workload differs from the
shipped prior learns it within tens of outcomes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from adactl.interface import ScheduleState, StepRecord
from adactl.runtime.types import DraftBatch

from .base import AcceptancePredictor
from .features import level_labels


class MovingAverage(AcceptancePredictor):
    name = "moving_average"

    def __init__(self, max_len: int = 16, decay: float = 0.995, prior: float = 0.5, strength: float = 25.0) -> None:
        if not 0 < decay < 1 or strength < 0:
            raise ValueError(f"decay must be in (0, 1) and strength >= 0, got {decay} and {strength}")
        self.decay, self.strength = decay, strength
        self.mean = torch.full((max_len,), float(prior))  # [max_len] alpha per position
        self.count = torch.zeros(max_len)  # [max_len] outcomes seen per position

    def alpha(self, k: int) -> torch.Tensor:
        """[k] the current alpha of positions 0 .. k-1 (the last known one repeats)."""
        if k <= len(self.mean):
            return self.mean[:k].clone()
        return torch.cat([self.mean, self.mean[-1:].expand(k - len(self.mean))])

    def predict(self, drafts: DraftBatch) -> torch.Tensor:
        b, k = drafts.tokens.shape
        if drafts.parents is not None:  # a tree node: its level's alpha
            depth = drafts.depth()
            return self.alpha(int(depth.max()) + 1 if k else 0)[depth]
        return self.alpha(k)[None, :].expand(b, k)

    def before_drafting(self, state: ScheduleState) -> torch.Tensor:
        return self.alpha(state.max_draft_len)[None, :].expand(len(state.running), state.max_draft_len)

    def update(self, record: StepRecord) -> None:
        self.learn(*level_labels(record))  # (per position; per level of a tree)

    def learn(self, observed: torch.Tensor, label: torch.Tensor) -> None:
        """One step's labels: observed [B, K] bool, accepted [B, K] float (`acceptance_labels`)."""
        k = min(observed.shape[1], len(self.mean))
        for j in range(k):
            self.observe(j, label[observed[:, j], j])

    def observe(self, j: int, outcomes: torch.Tensor) -> None:
        """Position j's outcomes of one step [n] (1 accepted, 0 rejected): the rule above."""
        n = len(outcomes)
        if n:
            c = self.strength + float(self.count[j])  # (strength inf: the exponential memory alone)
            w = self.decay**n if math.isinf(c) else min(self.decay**n, c / (c + n))
            self.mean[j] = w * self.mean[j] + (1 - w) * outcomes.float().mean()
            self.count[j] += n

    def to_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "strength": self.strength, "mean": self.mean.tolist(),
                "count": self.count.tolist()}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MovingAverage:
        """A saved average (a shipped one has no `count`: its means weigh as `strength` outcomes)."""
        ma = cls(max_len=len(d["mean"]), decay=d["decay"], strength=d.get("strength", 25.0))
        ma.mean = torch.tensor(d["mean"], dtype=torch.float32)
        ma.count = torch.tensor(d.get("count", [0.0] * len(d["mean"])), dtype=torch.float32)
        return ma
