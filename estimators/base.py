"""The shape every acceptance predictor has: drafts in, conditional acceptance alpha out.

A predictor fills `predict(drafts) -> [B, K]` (alpha per row and position); `estimate`
takes a `VerifyState` (or the `DraftBatch` itself), clamps alpha to [0, 1] and zeroes the
positions a row did not draft. The library composes alpha into prefix survival
(`AcceptanceEstimate.survival`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adactl.interface import AcceptanceEstimate, ScheduleState, StepRecord, VerifyState
from adactl.runtime.types import DraftBatch

from .features import drafted_mask


def drafts_of(state: VerifyState | DraftBatch) -> DraftBatch:
    return state.drafts if isinstance(state, VerifyState) else state


class AcceptancePredictor:
    """Base class; subclasses define `predict` and, if they learn online, `update`."""

    name = "acceptance"

    def estimate(self, state: VerifyState | DraftBatch | ScheduleState) -> AcceptanceEstimate:
        """At the verify decision: alpha of the drafts [B, K]. At the schedule decision (no
        drafts yet): alpha [R, max_draft_len] for the running requests, if the predictor
        can say anything before drafting (`before_drafting`)."""
        if isinstance(state, ScheduleState):
            return AcceptanceEstimate(self.before_drafting(state).float().clamp(0.0, 1.0))
        drafts = drafts_of(state)
        alpha = self.predict(drafts).float().clamp(0.0, 1.0) * drafted_mask(drafts)
        return AcceptanceEstimate(alpha, drafts.parents)

    def predict(self, drafts: DraftBatch) -> torch.Tensor:
        raise NotImplementedError

    def before_drafting(self, state: ScheduleState) -> torch.Tensor:
        raise TypeError(f"the {self.name} predictor reads the drafts: use it at the verify decision")

    def update(self, record: StepRecord) -> None:
        return None

    # saving: every predictor is plain numbers, stored as JSON (never a pickle)
    def to_dict(self) -> dict[str, Any]:
        return {}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"kind": self.name, **self.to_dict()}, indent=1) + "\n")
