"""Speculative Verification: verify the draft prefixes that pay, chosen for the whole batch.

After drafting, with survival s_ij = prod_{l <= j} alpha_il from an acceptance estimator
(the companion signal by default), verifying v_i tokens of row i yields in expectation
1 + E_i(v_i) tokens, E_i(v) = sum_{j < v} s_ij. The step's predicted time T(v) comes from
the step-time model on the step's shape (rows, verify tokens, the longest verify, draft
tokens, context). SV picks, over all rows at once,

    v* = argmax_v  sum_i (1 + E_i(v_i)) / T(v)

Step time is a staircase in tokens per step, so the search is global, not hill-climbing:
the candidates are v_i(tau, c) = min(c, #{j : s_ij >= tau}) for every survival threshold
tau on a grid and every cap c = 0..K (a rectangular verify forward costs by its longest
row), all scored with one batched call of the step-time model.
"""

from __future__ import annotations

import numpy as np
import torch

from adactl.estimators.step_time import StepShape, StepTimePredictor
from adactl.interface import AcceptanceEstimate, Controller, Estimator, VerifyState
from adactl.runtime.shapes import context_of, draft_work
from adactl.runtime.types import DraftBatch


class SpeculativeVerification(Controller):
    name = "sv"

    def __init__(self, estimator: Estimator, step_time: StepTimePredictor, thresholds: int = 16) -> None:
        self.estimator = estimator
        self.step_time = step_time
        self.taus = torch.linspace(0.0, 0.95, thresholds)  # tau = 0 verifies whole drafts

    def candidates(self, survival: torch.Tensor, draft_len: torch.Tensor) -> torch.Tensor:
        """[C, B] verify lengths to score: every (threshold, cap) pair, duplicates removed."""
        return prefix_candidates(survival, draft_len, self.taus)

    def act(self, state: VerifyState, utilities: AcceptanceEstimate) -> torch.Tensor:
        d = state.drafts
        if int(d.draft_len.sum()) == 0:  # nothing drafted (e.g. a prefill-only step)
            return d.draft_len.clone()
        survival = utilities.survival  # [B, K]
        cands = self.candidates(survival, d.draft_len)  # [C, B]
        tokens = (1 + expected_gain(survival).gather(1, cands.T)).sum(0)  # [C] expected tokens per candidate
        best = int(np.argmax(tokens.numpy() / self.seconds(d, cands)))
        return cands[best].long()

    def seconds(self, d: DraftBatch, cands: torch.Tensor) -> np.ndarray:
        """[C] predicted step seconds of each candidate [C, B] of verify lengths."""
        context, span = context_of(d.context_len)
        fed, forwards = draft_work(d.draft_len, d.parents)
        shapes = [StepShape.of_lengths(c, fed, 0, context, forwards=forwards, span=span) for c in cands]
        return np.maximum(self.step_time.predict(shapes), 1e-6)


def prefix_candidates(survival: torch.Tensor, limit: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """[C, B] prefix lengths: for every survival threshold tau in `taus` and cap c = 0..K, row
    i takes min(c, limit_i, the shortest prefix holding every position whose survival [B, K]
    clears tau); duplicates removed. Taking the positions of largest survival first is what
    maximises expected tokens for a given number of tokens, and a cap bounds the longest row
    (a rectangular forward costs by its longest row)."""
    k = survival.shape[1]
    # on a chain survival is non-increasing, so these are the positions themselves; on a tree,
    # nodes come by draft path value, which mostly but not always agrees with the estimate
    position = torch.arange(1, k + 1)[None, None, :]
    above = ((survival[None, :, :] >= taus[:, None, None]) * position).amax(2)  # [T, B]
    above = torch.minimum(above, limit[None, :])
    caps = torch.arange(k + 1)[:, None, None]  # [K + 1, 1, 1]
    cands = torch.minimum(above[None, :, :], caps).reshape(-1, survival.shape[0])  # [(K+1) * T, B]
    return torch.unique(cands, dim=0)


def expected_gain(survival: torch.Tensor) -> torch.Tensor:
    """[B, K + 1] expected accepted draft tokens when verifying v = 0..K (sum of survival)."""
    return torch.cat([torch.zeros(survival.shape[0], 1), survival.cumsum(1)], 1)
