"""Per-request acceptance before drafting: a logistic model with a term per request.

Acceptance spreads threefold between requests of one workload (the default pair, k = 4,
greedy: chat p10 / p50 / p90 = 0.14 / 0.22 / 0.39 of a draft kept), and greedy and sampled
rows differ, so one average per position for the batch (`MovingAverage`) drafts too much for
some rows and too little for others. This estimator says, before drafting, for each running
request i (of kind g: greedy or sampled rows) and draft position j:

    alpha_ij = sigmoid(mu_gj + b_i)

- mu_gj: the kind's log-odds at position j (started from the `MovingAverage` given);
- b_i: the request's offset, 0 until it is observed, with a N(0, `prior_sd`^2) prior: by
  default 0.5, the spread of the shipped traces (greedy position-0 acceptance p10 / p90 =
  0.37 / 0.63, about +-0.53 in log-odds). A looser prior (1.5) let one rejected token at
  batch 1 move b_i by -0.7, after which the request never drafted again (0.71x the best
  fixed k on this CPU, mixed, batch 1); a population that differs more (half the requests at
  90%, half at 15%: +-2 in log-odds) needs a looser one to be told apart quickly. (Learning
  the spread by EM over the running requests collapsed to its floor: the per-position terms
  absorb part of the requests' differences.)

Each verified position is an observation y in {0, 1} (accepted, given the one before was).
Both terms learn by one Newton step a step on the log-likelihood, with their information
(the sum of p(1 - p) over their observations) decayed so that they follow drift:

    b_i  <- b_i  + (sum_i (y - p) - lambda * b_i) / (H_i + lambda),  H_i  <- d * H_i + sum_i p (1 - p)
    mu_gj <- mu_gj + sum_gj (y - p) / (H_gj + h0),                   H_gj <- d_mu * H_gj + sum_gj p (1 - p)

(p = sigmoid(mu_gj + b_i) before the step, lambda = 1 / prior_sd^2, d = `decay` per
observation of the request: a row that drafts rarely keeps what it learned; d_mu =
`kind_decay` per step; h0 = 2, the kind's prior in the same units of information). With h0 =
20, a draft that never agrees with the target (found on an H200 with random target weights,
2026-12-04) was still priced at 0.13 after 300 rejections at batch 1, so the batch kept
drafting: 0.88x plain decoding in the replay of the computed H100 (96-token requests,
acceptance 0), 0.98x with h0 = 2; on the shipped traces (mixed, ShareGPT and HumanEval,
both temperatures, batch 1-64) the two agree within 1% but in one cell of one sweep
(docs/per_request.md). Fitting the two together is what keeps them apart: position j > 0 is
observed only on rows whose draft got that far, which are the rows that accept more, so a
per-position average (or a per-request factor on it) overstates a typical row's acceptance
there; with b_i in the model, a good row reaching position 2 moves its own b_i, not mu_g2.
(A first version scaled the moving average by each request's accepted / predicted ratio: in
the replay of the computed H100 it predicted 0.91 at position 3 for a population whose rows
accept 0.5 on average, and lost 5% to the batch-mean goodput length at batch 64.)

At the verify decision it gives the same numbers for the drafted rows (it does not read the
drafts). A request's term is dropped when it finishes.

Token trees have their own per-kind terms: on a tree step the observation at level j is
whether the accepted path went one level deeper, given it reached j and every alternative
drafted there was verified (`tree_level_labels`: with `width` alternatives per level it is
accepted more often than a chain's position j), and

    alpha^tree_ij = sigmoid(nu_gj + b_i)

with the same request offset b_i (a request whose draft the target agrees with does so in
both shapes) and nu_gj started at 1 - (1 - alpha_gj)(1 - `sibling_prior`): the chance that
one of the level's later alternatives is accepted when the first is not (0.3, the
`GoodputTree` prior; the shipped ShareGPT tree traces give 0.12 greedy and 0.16 at
temperature 0.7 for the second of two, which the tree steps teach it). A tree step also
teaches the chain terms: the first child of each node on the accepted path is the draft's
own first choice, as a chain drafts it (`first_child_labels`), so a server that drafts trees
keeps learning what a chain would gain. `tree_alpha_of` reads the tree terms
(`RequestGoodputTree`); a tree node's alpha at the verify decision is still its level's chain
alpha (`predict`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from adactl.interface import ScheduleState, StepRecord
from adactl.runtime.types import DraftBatch

from .base import AcceptancePredictor
from .features import first_child_labels, tree_level_labels
from .moving_average import MovingAverage


def tree_level_prior(alpha: torch.Tensor, sibling: float) -> torch.Tensor:
    """A tree level's acceptance from a chain position's `alpha` when a later alternative is
    accepted with probability `sibling` where the first is not: 1 - (1 - alpha)(1 - sibling)."""
    return 1 - (1 - alpha) * (1 - sibling)


def width_sibling_prior(width: int) -> float:
    """The prior chance that one of a level's `width` - 1 later alternatives is accepted where
    the first is not: 0.3 for width 2, each doubling of the width leaving 0.7 of the miss
    (1 - 0.7^log2(width): 0.51 at width 4). On the shipped ShareGPT tree traces (levels 1-2,
    `width` d nodes kept): greedy 0.24-0.26 at width 2 and 0.38-0.42 at width 4, sampled (walked
    at one uniform of 0.5) 0.2 and 0.3-0.38; a prior a little high has a controller try trees, and learn."""
    return 1 - 0.7 ** math.log2(width) if width > 1 else 0.0


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-3, 1 - 1e-3)
    return torch.log(p / (1 - p))


class RequestAcceptance(AcceptancePredictor):
    name = "request"

    def __init__(self, prior: MovingAverage | None = None, prior_sd: float = 0.5, decay: float = 0.97,
                 kind_decay: float = 0.995, h0: float = 2.0, cap: float = 0.98,
                 sibling_prior: float = 0.3) -> None:  # fmt: skip
        chain = (prior if prior is not None else MovingAverage()).mean.float()
        base, tree = _logit(chain), _logit(tree_level_prior(chain, sibling_prior))
        self.mu = {True: base.clone(), False: base.clone()}  # [P] per kind: greedy rows, sampled rows
        self.info = {True: torch.zeros_like(base), False: torch.zeros_like(base)}  # H_gj
        self.tree_mu = {True: tree.clone(), False: tree.clone()}  # nu_gj: tree levels
        self.tree_info = {True: torch.zeros_like(base), False: torch.zeros_like(base)}
        self.prior_sd, self.decay, self.kind_decay, self.h0, self.cap = prior_sd, decay, kind_decay, h0, cap
        self.sibling_prior = sibling_prior
        self.offset: dict[str, float] = {}  # b_i
        self.evidence: dict[str, float] = {}  # H_i

    def kind_logits(self, greedy: bool, k: int, tree: bool = False) -> torch.Tensor:
        """[k] mu_gj (tree: nu_gj) for positions 0 .. k-1 (the last position repeats)."""
        mu = (self.tree_mu if tree else self.mu)[greedy]
        return mu[:k] if k <= len(mu) else torch.cat([mu, mu[-1:].expand(k - len(mu))])

    def kind_alpha(self, greedy: bool, k: int) -> torch.Tensor:
        """[k] sigmoid(mu_gj): a request of this kind before it is observed."""
        return torch.sigmoid(self.kind_logits(greedy, k))

    def alpha_of(self, request_ids: tuple[str, ...] | list[str], greedy: list[bool], k: int,
                 tree: bool = False) -> torch.Tensor:  # fmt: skip
        """[R, k] alpha_ij of the requests (the docstring's formula; tree: alpha^tree_ij, per level)."""
        if not request_ids:
            return torch.zeros(0, k)
        mu = torch.stack([self.kind_logits(g, k, tree) for g in greedy])  # [R, k]
        b = torch.tensor([self.offset.get(r, 0.0) for r in request_ids])[:, None]  # [R, 1]
        return torch.sigmoid(mu + b).clamp(0.0, self.cap)

    def tree_alpha_of(self, request_ids: tuple[str, ...] | list[str], greedy: list[bool], k: int) -> torch.Tensor:
        """[R, k] the chance each request's tree path goes one level deeper at levels 0 .. k-1."""
        return self.alpha_of(request_ids, greedy, k, tree=True)

    def before_drafting(self, state: ScheduleState) -> torch.Tensor:
        running = state.running
        greedy = [r.sampling.temperature <= 0 for r in running]
        return self.alpha_of([r.request_id for r in running], greedy, state.max_draft_len)

    def predict(self, drafts: DraftBatch) -> torch.Tensor:
        if drafts.parents is not None:  # a tree node: its level's alpha
            depth = drafts.depth()
            levels = int(depth.max()) + 1 if depth.numel() else 0
            alpha = self.alpha_of(drafts.request_ids, drafts.greedy.tolist(), levels)
            return alpha.gather(1, depth.clamp(min=0)) if alpha.numel() else torch.zeros_like(depth, dtype=torch.float)
        return self.alpha_of(drafts.request_ids, drafts.greedy.tolist(), drafts.tokens.shape[1])

    def update(self, record: StepRecord) -> None:
        d = record.drafts
        if d.tokens.shape[1] and d.request_ids:
            if d.parents is not None:  # a tree step teaches its levels, and its first choices the chain terms
                self._learn(d.request_ids, d.greedy.tolist(), *tree_level_labels(record), tree=True)
            self._learn(d.request_ids, d.greedy.tolist(), *first_child_labels(record))
        for rid in record.outcome.finished:
            self.offset.pop(rid, None)
            self.evidence.pop(rid, None)

    def _learn(self, ids: tuple[str, ...], greedy: list[bool], observed: torch.Tensor, label: torch.Tensor,
               tree: bool = False) -> None:  # fmt: skip
        """One Newton step for each observed request's b_i and each kind's mu_gj (tree: nu_gj)."""
        mu, infos = (self.tree_mu, self.tree_info) if tree else (self.mu, self.info)
        k = min(observed.shape[1], len(mu[True]))
        observed, label = observed[:, :k], label[:, :k]
        p = self.alpha_of(ids, greedy, k, tree).clamp(1e-4, 1 - 1e-4)  # [B, k] before this step
        residual = torch.where(observed, label - p, 0.0)
        weight = torch.where(observed, p * (1 - p), 0.0)
        lam = 1.0 / self.prior_sd**2
        for i, rid in enumerate(ids):
            if bool(observed[i].any()):
                h = self.decay ** int(observed[i].sum()) * self.evidence.get(rid, 0.0) + float(weight[i].sum())
                b = self.offset.get(rid, 0.0)
                self.offset[rid] = b + (float(residual[i].sum()) - lam * b) / (h + lam)
                self.evidence[rid] = h
        for g in (True, False):
            rows = torch.tensor(greedy) == g
            if bool(rows.any()):
                info = self.kind_decay * infos[g][:k] + weight[rows].sum(0)
                mu[g][:k] += residual[rows].sum(0) / (info + self.h0)
                infos[g][:k] = info

    def to_dict(self) -> dict[str, Any]:
        return {"prior_sd": self.prior_sd, "decay": self.decay, "kind_decay": self.kind_decay, "h0": self.h0,
                "cap": self.cap, "greedy": torch.sigmoid(self.mu[True]).tolist(),
                "sampled": torch.sigmoid(self.mu[False]).tolist(), "sibling_prior": self.sibling_prior,
                "tree_greedy": torch.sigmoid(self.tree_mu[True]).tolist(),
                "tree_sampled": torch.sigmoid(self.tree_mu[False]).tolist()}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestAcceptance:
        sibling = d.get("sibling_prior", 0.3)  # (saved before tree terms: they start from their prior)
        out = cls(prior_sd=d["prior_sd"], decay=d["decay"], kind_decay=d["kind_decay"], h0=d["h0"], cap=d["cap"],
                  sibling_prior=sibling)  # fmt: skip
        for g, key in ((True, "greedy"), (False, "sampled")):
            chain = torch.tensor(d[key])
            tree = torch.tensor(d[f"tree_{key}"]) if f"tree_{key}" in d else tree_level_prior(chain, sibling)
            out.mu[g], out.tree_mu[g] = _logit(chain), _logit(tree)
            out.info[g], out.tree_info[g] = torch.zeros_like(chain), torch.zeros_like(tree)
        return out
