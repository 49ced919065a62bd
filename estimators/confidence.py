"""Draft confidence: alpha_j = the draft's probability of its own token at position j.

What EAGLE-2 ranks tree nodes by and what transformers' assisted generation stops on (0.4).
Cheap and informative but not calibrated; `calibration` (an `IsotonicMap` fitted on traces by
train/fit_estimators.py) turns it into a calibrated probability.
"""

from __future__ import annotations

from typing import Any

import torch

from adactl.runtime.types import DraftBatch

from .base import AcceptancePredictor
from .calibration import IsotonicMap
from .features import own_prob


class DraftConfidence(AcceptancePredictor):
    name = "confidence"

    def __init__(self, calibration: IsotonicMap | None = None) -> None:
        self.calibration = calibration

    def predict(self, drafts: DraftBatch) -> torch.Tensor:
        q = own_prob(drafts)
        return self.calibration(q) if self.calibration is not None else q

    def to_dict(self) -> dict[str, Any]:
        return {"calibration": self.calibration.to_dict() if self.calibration is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DraftConfidence:
        return cls(IsotonicMap.from_dict(d["calibration"]) if d.get("calibration") else None)
