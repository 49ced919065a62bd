"""Token-tree controllers: what tree each request drafts, and which nodes the batch verifies.

Drafting (schedule decision):
- `TreeDraft(spec)`: every running request drafts the same tree (`TreeSpec`: depth, width,
  nodes kept), the tree counterpart of a fixed draft length;
- `GoodputTree`: the tree follows the load. Its depth is the goodput-optimal chain length c*
  of `GoodputLength` (tokens per predicted second from the step-time model), with `width`
  alternatives per level and `width * c*` nodes kept; c* = 0 (a busy batch, where
  verification is no longer nearly free) drafts nothing.

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

from adactl.estimators.step_time import StepTimePredictor
from adactl.interface import AcceptanceEstimate, Controller, Estimator, ScheduleState
from adactl.runtime.types import StepPlan, TreeSpec

from .goodput import GoodputLength
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


class GoodputTree(Controller):
    name = "goodput-tree"

    def __init__(self, step_time: StepTimePredictor, estimator: Estimator | None = None, width: int = 2) -> None:
        self.goodput = GoodputLength(step_time, estimator)
        self.estimator = self.goodput.estimator
        self.width = width

    def act(self, state: ScheduleState, utilities: AcceptanceEstimate) -> StepPlan:
        base = self.goodput.act(state, utilities)
        depth = int(base.draft_len) if isinstance(base.draft_len, int) else 0
        if depth == 0:
            return replace(base, draft_len=0, tree=None)
        return replace(base, draft_len=0, tree=tree_of_depth(depth, self.width))


def tree_of_depth(depth: int, width: int) -> TreeSpec:
    """The tree the goodput and SLO controllers draft for a chain length: `width`
    alternatives per level, `width * depth` nodes kept."""
    return TreeSpec(depth=depth, width=width, nodes=width * depth) if depth else TreeSpec(0, 0, 0)


class GlobalTreeAllocation(SpeculativeVerification):
    name = "tree-alloc"
