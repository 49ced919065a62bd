"""Verify while confident: the stop rule of transformers' assisted generation, per row.

    verify_len_i = min{ j : alpha_ij < threshold }  (the whole draft if none is below)

with alpha from any acceptance estimator (default: the draft's own-token probability, with
transformers' threshold 0.4). Positions after the first unlikely one are not verified.
"""

from __future__ import annotations

import torch

from adactl.estimators.confidence import DraftConfidence
from adactl.interface import AcceptanceEstimate, Controller, Estimator, VerifyState


class ConfidenceStop(Controller):
    def __init__(self, threshold: float = 0.4, estimator: Estimator | None = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold
        self.estimator = estimator if estimator is not None else DraftConfidence()

    def act(self, state: VerifyState, utilities: AcceptanceEstimate) -> torch.Tensor:
        low = utilities.alpha < self.threshold  # [B, K]
        k = low.shape[1]
        if k == 0 or low.shape[0] == 0:
            return state.drafts.draft_len.clone()
        first_low = torch.where(low.any(1), low.float().argmax(1), torch.full_like(state.drafts.draft_len, k))
        return torch.minimum(first_low.long(), state.drafts.draft_len)
