"""SLO-customised speculation (AdaServe), chain version: speculate, select, verify.

Speculate (`SLODraftLength`, a schedule controller): each running request drafts the
throughput-optimal length of `GoodputLength` (often 0 on a busy CPU), raised for requests
whose TPOT SLO needs more tokens this step than plain decoding gives (need_i(T) below, with
alpha_j from the estimator and T from the step-time model on the resulting plan).
Select and verify (`AdaServe`, a verify controller): the verify lengths are selected. Request i, with a
TPOT SLO s_i, has emitted n_i tokens in e_i seconds since its first token. If this step
takes T seconds it stays on its SLO only with

    need_i(T) = (e_i + T) / s_i - n_i

tokens from this step; verifying v tokens gives it 1 + E_i(v) in expectation
(E_i(v) = sum_{j < v} s_ij, survival from an acceptance estimator). Selection, global over
the batch:
  1. SLO first: each request gets at least the smallest v with 1 + E_i(v) >= need_i(T);
     a request that no v can bring back on its SLO this step gets the smallest v that keeps
     its pace, 1 + E_i(v) >= T / s_i (the speculate step's steady-state need), and none if
     no v does. (With no minimum at all for a request behind, as AdaServe's description
     reads, the tight class of the mixed-SLO replay at 60 requests/s fell behind for good:
     0.96x the best fixed k's attainment, 1.00x with the pace.)
  2. the rest goes where it adds the most expected tokens per second: every candidate of
     Speculative Verification (survival threshold x cap) is raised to those minimums, and
     the one with the most requests expected on their SLO wins, then the one with the most
     expected tokens per predicted second.
T depends on the selection, so the minimums are computed with each candidate's own T.
Requests without a TPOT SLO only take part in step 2. Over token trees
(`SLODraftLength(tree_width=w)` drafts a tree of depth c_i with w alternatives per level,
counting a level accepted where any alternative is: learned from the trees it drafts, and
until then 1 - (1 - alpha)(1 - `sibling_prior`); each plan priced as the trees it drafts,
`tree_shape`), the same selection runs on node
survival (the product of alpha over a node and its ancestors): E_i(v) sums it over the first
v nodes, and the chain version is the w = 1 case.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from adactl.estimators.moving_average import MovingAverage
from adactl.estimators.step_time import StepShape, StepTimePredictor
from adactl.interface import AcceptanceEstimate, Controller, Estimator, ScheduleState, StepRecord, VerifyState
from adactl.runtime.types import RequestView, StepPlan

from .goodput import GoodputLength
from .sv import SpeculativeVerification, expected_gain
from .trees import TreeLevels, tree_of_depth, tree_shape


def slo_progress(view: RequestView | None, now: float) -> tuple[float, float, float]:
    """(TPOT SLO s (inf without one), tokens emitted n, seconds since the first token e)."""
    if view is None:
        return float("inf"), 0.0, 0.0
    s = view.slo.tpot_s if view.slo is not None and view.slo.tpot_s else float("inf")
    e = max(0.0, now - view.first_token_time) if view.first_token_time is not None else 0.0
    return s, float(view.num_generated), e


class SLODraftLength(Controller):
    """AdaServe's speculate step: per-request draft lengths, SLO first.

    c_i = max(c*, the smallest c with 1 + G(c) >= need_i(T)),  G(c) = sum_{j<c} prod_{i<=j} alpha_i,
    need_i(T) = (e_i + T) / s_i - n_i (AdaServe's catch-up need) or, when no c <= K reaches
    it, T / s_i (the steady-state need); c* = the goodput length for everyone. T is the
    step-time model's prediction for the plan itself (two fixed-point passes).

    Then a cap m on every row's length, priced: the draft runs as many forwards as the longest
    row drafts, and every row of the step waits for them, so one tight request's long draft
    slows the whole batch. Of the plans with every row at min(c_i, m) and with every row at m
    (m = 0..K), the step takes the one with the most requests expected on their SLO this step
    (1 + G(c_i) >= need_i(T), T that plan's predicted time), then the most expected tokens
    per predicted second, as `AdaServe` selects verify lengths. (Without them, in the replay
    of the computed H100 at 60 requests/s, the tight class's drafts cost the batch more than
    they won: 0.89x the best fixed k's attainment; with them 0.96x.)"""

    name = "slo-draft"

    def __init__(self, step_time: StepTimePredictor, estimator: Estimator | None = None, tree_width: int = 1,
                 sibling_prior: float | None = None, seed: int = 0) -> None:  # fmt: skip
        self.step_time = step_time
        self.estimator = estimator if estimator is not None else MovingAverage()
        # (its probes' draws; the throughput rule: the SLOs, not the run's end, price the drain here)
        self.goodput = GoodputLength(step_time, self.estimator, seed=seed, drain=False)
        self.tree_width = tree_width  # 1: chains; w > 1: trees of depth c_i, w alternatives per level
        # trees: the level acceptance learned from the trees it drafts (`TreeLevels`, as
        # GoodputTree's); until then the chain's, raised by a later alternative's chance where
        # the first fails; at the chain estimate's pace, as GoodputTree's (a hard-coded 0.98
        # outlived the chain's move to 0.995 in issue 30)
        pace = getattr(self.estimator, "decay", MovingAverage().decay)
        self.tree = TreeLevels(tree_width, pace, sibling=sibling_prior) if tree_width > 1 else None

    def update(self, record: StepRecord) -> None:
        if self.tree is not None:
            self.tree.update(record)

    def _shape(self, lengths: list[int], prefill: int, context: int) -> StepShape:
        """The step whose rows draft `lengths` (chains, or trees of those depths) and verify all."""
        return tree_shape(lengths, self.tree_width, prefill, context)

    def act(self, state: ScheduleState, utilities: AcceptanceEstimate) -> StepPlan:
        base = self.goodput.act(state, utilities)
        running = [r for r in state.running if state.plan.run is None or r.request_id in state.plan.run]
        k = state.max_draft_len
        if not running or k == 0:
            return base
        alpha = utilities.alpha.mean(0) if utilities.alpha.numel() else torch.zeros(k)
        if self.tree is not None:  # a tree level is accepted where any of its alternatives is
            alpha = self.tree.alpha(alpha[:k])
        gain = 1 + torch.cat([torch.zeros(1), torch.cumprod(alpha[:k], 0).cumsum(0)]).numpy()  # [K + 1]
        c_star = int(base.draft_len) if isinstance(base.draft_len, int) else 0
        progress = [slo_progress(r, state.now) for r in running]
        lengths = np.full(len(running), c_star)
        context = sum(r.context_len for r in running)
        prefill = state.prefill_tokens
        for _ in range(2):
            t = float(self.step_time.predict([self._shape(lengths.tolist(), prefill, context)])[0])
            new = np.full(len(running), c_star)
            for i, (s, n, e) in enumerate(progress):
                if not np.isfinite(s):
                    continue
                for need in ((e + t) / s - n, t / s):
                    reach = np.nonzero(gain >= need)[0]
                    if len(reach):
                        new[i] = max(c_star, int(reach[0]))
                        break
            lengths = new
        room = np.array([r.draft_room for r in running])
        lengths = self._capped(np.minimum(lengths, room), room, gain, progress, prefill, context)
        if self.tree_width > 1:
            trees = {r.request_id: tree_of_depth(int(c), self.tree_width) for r, c in zip(running, lengths)}
            return replace(base, draft_len=0, tree=trees)
        return replace(base, draft_len={r.request_id: int(c) for r, c in zip(running, lengths)})

    def _capped(self, lengths: np.ndarray, room: np.ndarray, gain: np.ndarray,
                progress: list[tuple[float, float, float]], prefill: int, context: int) -> np.ndarray:  # fmt: skip
        """`lengths` capped at the m of the class docstring's last paragraph (rows at most their
        `room`; over trees, each plan priced as its trees, `tree_shape`)."""
        s, n, e = (np.asarray(x, dtype=float) for x in zip(*progress))
        caps = sorted({int(c) for c in lengths} | {0})
        cands = [np.minimum(lengths, m) for m in caps] + [np.minimum(room, m) for m in range(1, len(gain))]
        seconds = self.step_time.predict([self._shape(c.tolist(), prefill, context) for c in cands])
        seconds = np.maximum(np.asarray(seconds, dtype=float), 1e-9)
        tokens = np.stack([gain[c] for c in cands])  # [M, R]
        need = (e[None, :] + seconds[:, None]) / s[None, :] - n[None, :]  # inf SLO: -n, always met
        on_slo = ((tokens >= need) & np.isfinite(s)[None, :]).sum(1)
        rate = tokens.sum(1) / seconds
        return cands[int(np.lexsort((rate, on_slo))[-1])]


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
        s, n, e = torch.tensor([slo_progress(views.get(rid), state.now) for rid in d.request_ids]).T.float()
        has_slo = torch.isfinite(s)

        cands = self.sv.candidates(utilities.survival, d.draft_len)  # [C, B]
        t = torch.from_numpy(self.sv.seconds(d, cands)).float()[:, None]  # [C, 1]
        minimum = torch.zeros_like(cands)
        for need in (t / s[None, :], (e[None, :] + t) / s[None, :] - n[None, :]):  # steady, then catch-up
            least = (gain[None, :, :] < need[:, :, None]).sum(2)  # [C, B] smallest v reaching need
            minimum = torch.where((least <= d.draft_len[None, :]) & has_slo[None, :], least, minimum)
        raised = torch.maximum(cands, minimum)
        seconds = self.sv.seconds(d, raised)
        tokens = gain.gather(1, raised.T).T  # [C, B]
        need = (e[None, :] + torch.from_numpy(seconds).float()[:, None]) / s[None, :] - n[None, :]
        on_slo = ((tokens >= need) & has_slo[None, :]).sum(1).numpy()  # [C]
        rate = tokens.sum(1).numpy() / seconds
        best = int(np.lexsort((rate, on_slo))[-1])  # most requests on SLO, then the best rate
        return raised[best].long()
