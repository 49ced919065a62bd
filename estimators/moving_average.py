"""Per-position moving average of acceptance: the simple baseline (SmartSpec, SGLang).

alpha_j = an exponential moving average, over verify outcomes, of the acceptance of draft
position j given j - 1 was accepted; the same for every request. On token trees, position j
is tree level j: the chance the accepted path goes one level deeper (`level_labels`). It ignores the draft's
distributions, so it can also be asked before drafting (`alpha(k)`).
"""

from __future__ import annotations

from typing import Any

import torch

from adactl.interface import ScheduleState, StepRecord
from adactl.runtime.types import DraftBatch

from .base import AcceptancePredictor
from .features import level_labels


class MovingAverage(AcceptancePredictor):
    name = "moving_average"

    def __init__(self, max_len: int = 16, decay: float = 0.98, prior: float = 0.5) -> None:
        self.decay = decay
        self.mean = torch.full((max_len,), float(prior))  # [max_len] alpha per position

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
            seen = observed[:, j]
            n = int(seen.sum())
            if n:
                w = self.decay**n
                self.mean[j] = w * self.mean[j] + (1 - w) * label[seen, j].mean()

    def to_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "mean": self.mean.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MovingAverage:
        ma = cls(max_len=len(d["mean"]), decay=d["decay"])
        ma.mean = torch.tensor(d["mean"], dtype=torch.float32)
        return ma
