"""Token-tree controllers: what tree each request drafts, and which nodes the batch verifies.

Drafting (schedule decision):
- `TreeDraft(spec)`: every running request drafts the same tree (`TreeSpec`: depth, width,
  nodes kept), the tree counterpart of a fixed draft length;
- `GoodputTree`: the shape follows the load: a chain or a tree, and how deep, whichever the
  step-time model and the measured per-level acceptance of each say yields the most tokens
  per second (nothing at all on a busy batch, where verification is no longer nearly free);
- `RequestGoodputTree`: the same per request: each request its own tree depth (or chain
  length) from its own acceptance, the batch's budget where it pays most.

Verification (the poster's batch-aware allocation), `GlobalTreeAllocation`: every drafted
node j of every row i has a survival s_ij = prod of alpha over j and its ancestors (the
chance it lies on the accepted path; alpha from an acceptance estimator). Verifying the
first v_i nodes of row i yields 1 + E_i(v_i) tokens in expectation, E_i(v) = sum_{j < v} s_ij,
and the step takes T(v) (step-time model). The verify-token budget goes to nodes in order of
survival across the whole batch: candidate allocations are v_i(tau, c) = min(c, #{j : s_ij >=
tau}) for a grid of survival thresholds tau and caps c on the longest row (the staircase of
a rectangular verify forward), and the one with the most expected tokens per predicted
second wins:

    v* = argmax_v  sum_i (1 + E_i(v_i)) / T(v)

(Speculative Verification's search, on tree survival instead of chain survival; a chain is
the one-child tree, where both agree.) The engine's nodes come best first with parents before
children, so every v_i verifies a tree.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch

from adactl.estimators.moving_average import MovingAverage
from adactl.estimators.request_acceptance import tree_level_prior, width_sibling_prior
from adactl.estimators.step_time import StepShape, StepTimePredictor
from adactl.interface import Controller, Estimator, RequestView, ScheduleState, StepRecord
from adactl.runtime.shapes import catchup_of, chain_shapes
from adactl.runtime.types import StepPlan, TreeSpec

from .goodput import sunk_prefill, with_catchup
from .request_goodput import CatchUp, RequestGoodput
from .sv import SpeculativeVerification


class TreeDraft(Controller):
    def __init__(self, spec: TreeSpec) -> None:
        spec.validate()
        self.spec = spec

    @property
    def name(self) -> str:
        s = self.spec
        return f"tree-d{s.depth}w{s.width}n{s.nodes}"

    def act(self, state: ScheduleState, utilities: object = None) -> StepPlan:
        s = self.spec
        depth = min(s.depth, max(state.max_draft_len, 0))
        return replace(state.plan, tree=TreeSpec(depth, s.width if depth else 0, s.nodes))


class TreeLevels:
    """A tree level's acceptance (the chance the accepted path goes one level deeper), for a
    controller choosing between chains and trees of one width: until it serves a tree step,
    the chain's acceptance raised by the later alternatives' chance (`tree_level_prior`,
    `width_sibling_prior(width)` unless given); from then on a `MovingAverage` of the levels its tree
    steps served (`level_labels`), started from that prior. Started from the average's flat
    0.5 instead, one tree step at width 4 priced trees below chains for good (level 0 0.48
    against the chain's 0.57), and they were never tried again: `goodput-tree` drafted one tree
    in 292 steps at batch 1 in the H100 replay, where a fixed width-4 tree was 1.19x faster."""

    def __init__(self, width: int, decay: float, max_len: int = 16, sibling: float | None = None) -> None:
        self.average = MovingAverage(max_len=max_len, decay=decay)
        self.sibling = width_sibling_prior(width) if sibling is None else sibling
        self.seen = False  # a tree step was served
        self._prior = torch.full((max_len,), 0.5)  # the last prior it was asked for (seeds the average)

    @property
    def decay(self) -> float:
        return self.average.decay

    def alpha(self, chain: torch.Tensor) -> torch.Tensor:
        """[k] the level acceptance, given the chain's acceptance [k] of positions 0 .. k-1."""
        if self.seen:
            return self.average.alpha(len(chain))
        prior = tree_level_prior(chain, self.sibling)
        n = min(len(prior), len(self._prior))
        if n:
            self._prior[:n] = prior[:n]
            self._prior[n:] = prior[n - 1]
        return prior

    def update(self, record: StepRecord) -> bool:
        """Learn the levels of a step that drafted tree nodes; whether it did."""
        if record.drafts.parents is None or int(record.drafts.draft_len.sum()) == 0:
            return False
        if not self.seen:
            self.average.mean[:] = self._prior
            self.seen = True
        self.average.update(record)
        return True


class GoodputTree(Controller):
    """Chain or tree, and how deep, by predicted goodput (tokens per predicted second).

    Candidates: chains of c = 0..K tokens and trees of depth c with `width` alternatives per
    level and `width * c` nodes (and `extra_nodes` more: `tree_nodes_kept`). A shape's expected tokens per request are
    1 + sum_{j < c} prod_{i <= j} a_i, with a_i its *per-level* acceptance (the chance the
    accepted path goes one level deeper), learned online for chains and for trees separately
    (`MovingAverage` on `level_labels`; trees: `TreeLevels`, which until trees have been tried
    takes 1 - (1 - a_chain)(1 - `sibling_prior`), and starts its average there). The
    step-time model prices each shape (rows, verify tokens, draft tokens) and, after a stretch
    without drafting, the draft's catch-up once over the steps the rows would go on drafting
    (`goodput.with_catchup`); the best rate wins. A busy batch picks c = 0 (no draft), an
    idle one whatever its measured acceptance pays for."""

    name = "goodput-tree"

    def __init__(
        self,
        step_time: StepTimePredictor,
        estimator: MovingAverage | None = None,
        width: int = 2,
        sibling_prior: float | None = None,
        extra_nodes: int = 0,
    ) -> None:
        if extra_nodes < 0:
            raise ValueError(f"extra_nodes must be >= 0, got {extra_nodes}")
        self.step_time = step_time
        self.chain = estimator if estimator is not None else MovingAverage()
        self.tree = TreeLevels(width, self.chain.decay, len(self.chain.mean), sibling_prior)
        self.width, self.extra = width, extra_nodes
        self.estimator = None  # learns in `update`: chain and tree steps teach different averages

    def act(self, state: ScheduleState, utilities: object = None) -> StepPlan:
        running = [r for r in state.running if state.plan.run is None or r.request_id in state.plan.run]
        rows, k = len(running), state.max_draft_len
        if rows == 0 or k == 0:
            return replace(state.plan, draft_len=0, tree=None)
        a_chain = self.chain.alpha(k)
        a_tree = self.tree.alpha(a_chain)
        context = sum(r.context_len for r in running)
        prefill = state.prefill_tokens
        options: list[tuple[int, int]] = [(c, 1) for c in range(k + 1)]
        options += [(c, self.width) for c in range(1, k + 1)] if self.width > 1 else []
        shapes, gains = [], []
        for c, w in options:
            a = a_chain if w == 1 else a_tree
            gains.append(rows * (1 + float(torch.cumprod(a[:c], 0).sum())))
            shapes.append(tree_shape([c] * rows, w, prefill, context, self.extra))  # (w = 1: a chain)
        tokens = np.array(gains)
        catchup = catchup_of([r.draft_lag for r in running])
        left = float(np.mean([r.draft_room + 1 for r in running]))
        priced = sunk_prefill(self.step_time, prefill)  # the prefill is paid whatever is drafted (goodput.SunkPrefill)
        seconds = with_catchup(priced, shapes, priced.predict(shapes), catchup, left, tokens / rows)
        rate = tokens / np.maximum(seconds, 1e-6)
        c, w = options[int(np.argmax(rate))]
        if w == 1:
            return replace(state.plan, draft_len=c, tree=None)
        return replace(state.plan, draft_len=0, tree=tree_of_depth(c, w, self.extra))

    def update(self, record: StepRecord) -> None:
        if not self.tree.update(record) and record.drafts.parents is None and int(record.drafts.draft_len.sum()) > 0:
            self.chain.update(record)


class RequestGoodputTree(RequestGoodput):
    """Per-request token trees: each running request drafts its own tree depth (or chain
    length), the batch's draft and verify budget allocated where it pays (the poster's global
    tree allocation, before drafting; `RequestGoodput` on chains).

    Each request i has, before drafting, its chain acceptance alpha_ij and its tree-level
    acceptance alpha^tree_ij (the chance the accepted path of a `width`-wide tree goes one
    level deeper at level j: `RequestAcceptance.tree_alpha_of`, learned from the tree steps
    it serves; another estimator: 1 - (1 - alpha_ij)(1 - `sibling_prior`)). A tree of depth
    d_i (`tree_of_depth`: the best `width` d_i nodes, and `extra_nodes` more) yields 1 + sum_{j < d_i} prod_{l <= j}
    alpha^tree_il tokens in expectation, and is priced (`tree_shape`) as `width` verify
    tokens a level and 1 + `width` (d_i - 1) draft tokens in max_i d_i draft forwards: an
    upper bound, since the best `width` d nodes by path value are sometimes shallower than d
    (on the shipped ShareGPT tree traces the kept tree is shallower in 7 / 22 / 35% of draws
    at d = 3 / 4 / 5, and feeds 4.8 / 6.5 / 7.6 tokens, not 5 / 7 / 9). The depths are
    searched like the chain lengths (every survival threshold and cap, `prefix_candidates`),
    and the plan with the most expected tokens per predicted second wins: all chains or all
    trees for the step, a tree plan only where it beats the best chain plan by `margin`. So
    a loaded batch drafts nothing, and past the knee, where a second alternative adds less
    than its nodes cost, chains, longer for the requests that accept more; below the knee
    the deepest row sets the draft's forwards and a row's extra nodes are nearly free, so
    rows that accept less draft nearly as deep. `GlobalTreeAllocation` (tree-alloc) then
    verifies the drafted nodes that pay. The bad-row rule and exploration are
    `RequestGoodput`'s; on a tree step a probed row drafts a depth-1 tree (`width` nodes)."""

    name = "goodput-req-tree"

    def __init__(self, step_time: StepTimePredictor, estimator: Estimator | None = None, width: int = 2,
                 sibling_prior: float | None = None, extra_nodes: int = 0, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(step_time, estimator, **kwargs)
        if width < 2 or extra_nodes < 0:
            raise ValueError(f"RequestGoodputTree needs width >= 2 (width 1 is a chain: goodput-req) and extra_nodes "
                             f">= 0, got {width} and {extra_nodes}")  # fmt: skip
        self.width, self.extra = width, extra_nodes
        self.sibling_prior = width_sibling_prior(width) if sibling_prior is None else sibling_prior

    def choose(self, views: list[RequestView], alpha: torch.Tensor, limit: torch.Tensor, context: int,
               prefill: int, catchup: CatchUp | None = None) -> tuple[torch.Tensor, bool]:  # fmt: skip
        chain = partial(chain_shapes, prefill=prefill, context=context)
        chains, chain_rate = self.search(torch.cumprod(alpha, 1), limit, chain, bound=True, catchup=catchup)
        tree_survival = torch.cumprod(self.tree_alpha(views, alpha), 1)
        tree = partial(tree_shapes, width=self.width, prefill=prefill, context=context, extra=self.extra)
        trees, tree_rate = self.search(tree_survival, limit, tree, catchup=catchup)
        if tree_rate > chain_rate * (1 + self.margin):
            return trees, True
        return chains, False

    def tree_alpha(self, views: list[RequestView], alpha: torch.Tensor) -> torch.Tensor:
        """[R, K] each row's tree-level acceptance."""
        of = getattr(self.estimator, "tree_alpha_of", None)
        if of is None:
            tree = tree_level_prior(alpha, self.sibling_prior)
        else:
            greedy = [r.sampling.temperature <= 0 for r in views]
            tree = of([r.request_id for r in views], greedy, alpha.shape[1]).float()
        return tree

    def plan_of(self, plan: StepPlan, views: list[RequestView], lengths: list[int], tree: bool) -> StepPlan:
        if not tree or not any(lengths):
            return replace(super().plan_of(plan, views, lengths, False), tree=None)
        specs = {r.request_id: tree_of_depth(d, self.width, self.extra) for r, d in zip(views, lengths) if d > 0}
        return replace(plan, draft_len=0, tree=specs)


def tree_shapes(candidates: torch.Tensor, width: int, prefill: int, context: int, extra: int = 0) -> list[StepShape]:
    """`tree_shape` of each candidate [C, R] (tree depths per row)."""
    return [tree_shape(c, width, prefill, context, extra) for c in candidates]


def tree_shape(depths: torch.Tensor | list[int], width: int, prefill: int, context: int, extra: int = 0) -> StepShape:
    """The shape of a step whose rows draft `tree_of_depth(d, width, extra)` trees of depths
    `depths` and verify every node (rows deepest first, as the engine orders them)."""
    ordered = sorted((int(d) for d in depths), reverse=True)
    fed = [1 + width * (d - 1) if d else 0 for d in ordered]
    kept = [tree_nodes_kept(d, width, extra) for d in ordered]
    return StepShape.of_lengths(kept, fed, prefill, context, forwards=max(ordered, default=0))


def tree_of_depth(depth: int, width: int, extra: int = 0) -> TreeSpec:
    """The tree the goodput and SLO controllers draft for a chain length: `width`
    alternatives per level, `tree_nodes_kept` nodes."""
    if not depth:
        return TreeSpec(0, 0, 0)
    return TreeSpec(depth=depth, width=width, nodes=tree_nodes_kept(depth, width, extra))


def tree_nodes_kept(depth: int, width: int, extra: int = 0) -> int:
    """`width` nodes a level and `extra` more (the best by path value: mostly the second
    level's), at most every node the growth proposes (`width` + `width`^2 (depth - 1))."""
    return min(width * depth + extra, width + width * width * (depth - 1)) if depth else 0


class GlobalTreeAllocation(SpeculativeVerification):
    name = "tree-alloc"
