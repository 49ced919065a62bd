"""The Speculative Verification companion signal.

A companion model the size of the draft (models/companion) runs next to it on the same
inputs (`runtime.feature_draft.WithCompanion`). Where the two disagree, the target tends to
reject. Per draft position: S = sum_v min(p_draft(v), p_companion(v)) (the overlap of the two
distributions) and A = min(1, p_companion(t) / p_draft(t)) for the drafted token t (the
rejection rule with the companion standing in for the target), together with the log
probabilities, the draft's own entropy and top-2 margin, the position and the request's recent
acceptance
(`features.COMPANION_FEATURES`), go to a logistic classifier (one for greedy rows, one for
sampled rows) whose output an isotonic map calibrates. Fitted on engine traces by train/fit_estimators.py.
"""

from __future__ import annotations

from typing import Any

import torch

from adactl.interface import StepRecord
from adactl.runtime.types import DraftBatch

from .base import AcceptancePredictor
from .calibration import IsotonicMap
from .features import COMPANION_FEATURES, RecentAcceptance, companion_features
from .logistic import ByMode


class CompanionSignal(AcceptancePredictor):
    name = "companion"
    features = COMPANION_FEATURES

    def __init__(
        self, model: ByMode | None = None, calibration: IsotonicMap | None = None, online: bool = False
    ) -> None:
        self.model = model or ByMode(len(self.features))
        self.calibration = calibration
        self.online = online
        self.recent = RecentAcceptance()

    def inputs(self, drafts: DraftBatch) -> torch.Tensor:
        return companion_features(drafts, self.recent(drafts.request_ids))

    def predict(self, drafts: DraftBatch) -> torch.Tensor:
        p = self.model.predict(self.inputs(drafts), drafts.greedy[:, None])
        return self.calibration(p) if self.calibration is not None else p

    def update(self, record: StepRecord) -> None:
        if self.online:
            self.model.learn(record, self.inputs(record.drafts))
        self.recent.update(record)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
            "online": self.online,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompanionSignal:
        cal = IsotonicMap.from_dict(d["calibration"]) if d.get("calibration") else None
        return cls(ByMode.from_dict(d["model"]), cal, d.get("online", False))
