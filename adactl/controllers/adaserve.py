"""SLO-customised speculation (AdaServe), chain version: speculate, select, verify.

Every request drafts (speculate); then the verify lengths are selected. Request i, with a
TPOT SLO s_i, has emitted n_i tokens in e_i seconds since its first token. If this step
takes T seconds it stays on its SLO only with

    need_i(T) = (e_i + T) / s_i - n_i

tokens from this step; verifying v tokens gives it 1 + E_i(v) in expectation
(E_i(v) = sum_{j < v} s_ij, survival from an acceptance estimator). Selection, global over
the batch:
  1. SLO first: each request gets at least the smallest v with 1 + E_i(v) >= need_i(T);
     a request that no v can keep on its SLO this step gets no minimum (verification spent
     on it would slow every other request and still miss);
  2. the rest goes where it adds the most expected tokens per second: every candidate of
     Speculative Verification (survival threshold x cap) is raised to those minimums, and
     the one with the most requests expected on their SLO wins, then the one with the most
     expected tokens per predicted second.
T depends on the selection, so the minimums are computed with each candidate's own T.
Requests without a TPOT SLO only take part in step 2. Token trees replace the chain in a
later issue: the selection only needs expected tokens per verified node.
"""

from __future__ import annotations

import numpy as np
import torch

from adactl.estimators.step_time import StepTimePredictor
from adactl.interface import AcceptanceEstimate, Controller, Estimator, VerifyState

from .sv import SpeculativeVerification, expected_gain


class AdaServe(Controller):
    name = "adaserve"

    def __init__(self, estimator: Estimator, step_time: StepTimePredictor, thresholds: int = 16) -> None:
        self.estimator = estimator
        self.sv = SpeculativeVerification(estimator, step_time, thresholds)

    def act(self, state: VerifyState, utilities: AcceptanceEstimate) -> torch.Tensor:
        d = state.drafts
        if int(d.draft_len.sum()) == 0:
            return d.draft_len.clone()
        gain = 1 + expected_gain(utilities.survival)  # [B, K + 1] expected tokens by verify length
        views = {r.request_id: r for r in state.requests}
        slo, done, since = [], [], []
        for rid in d.request_ids:
            v = views.get(rid)
            tpot = v.slo.tpot_s if v is not None and v.slo is not None else None
            slo.append(tpot if tpot else float("inf"))
            done.append(v.num_generated if v is not None else 0)
            first = v.first_token_time if v is not None else None
            since.append(max(0.0, state.now - first) if first is not None else 0.0)
        s, n, e = torch.tensor(slo), torch.tensor(done, dtype=torch.float32), torch.tensor(since)
        has_slo = torch.isfinite(s)

        cands = self.sv.candidates(utilities.survival, d.draft_len)  # [C, B]
        need = (e[None, :] + torch.from_numpy(self.sv.seconds(d, cands)).float()[:, None]) / s[None, :] - n[None, :]
        minimum = (gain[None, :, :] < need[:, :, None]).sum(2)  # [C, B] smallest v reaching need
        reachable = minimum <= d.draft_len[None, :]
        minimum = torch.where(reachable & has_slo[None, :], minimum, torch.zeros_like(minimum))
        raised = torch.maximum(cands, minimum)
        seconds = self.sv.seconds(d, raised)
        tokens = gain.gather(1, raised.T).T  # [C, B]
        need = (e[None, :] + torch.from_numpy(seconds).float()[:, None]) / s[None, :] - n[None, :]
        on_slo = ((tokens >= need) & has_slo[None, :]).sum(1).numpy()  # [C]
        rate = tokens.sum(1).numpy() / seconds
        best = int(np.lexsort((rate, on_slo))[-1])  # most requests on SLO, then the best rate
        return raised[best].long()
