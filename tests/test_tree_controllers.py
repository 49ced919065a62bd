"""Tree controllers: global tree allocation, AdaServe over trees, the tree oracle, and the
estimators' labels on trees, in the control loop on tiny random Llamas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adactl.controllers import (
    AdaServe,
    GlobalTreeAllocation,
    GoodputTree,
    SLODraftLength,
    TreeDraft,
    oracle,
)
from adactl.estimators import MovingAverage
from adactl.estimators.features import acceptance_labels, level_labels
from adactl.interface import AcceptanceEstimate, InvalidAction, ScheduleState, StepRecord, check_plan, path_products
from adactl.loop import ControlLoop
from adactl.runtime import SLO, SamplingParams, StepPlan, TreeSpec

from .helpers import greedy_reference, make_engine, prompts
from .test_controllers import step_time  # noqa: F401  (module fixture)

TREE = TreeSpec(depth=3, width=2, nodes=6)


def test_tree_survival_multiplies_along_the_path():
    alpha = torch.tensor([[0.5, 0.4, 0.8, 0.5]])
    parents = torch.tensor([[-1, -1, 0, 2]])
    est = AcceptanceEstimate(alpha, parents)
    torch.testing.assert_close(est.survival, torch.tensor([[0.5, 0.4, 0.4, 0.2]]))
    torch.testing.assert_close(path_products(alpha, parents), est.survival)
    assert torch.equal(AcceptanceEstimate(alpha).survival, torch.cumprod(alpha, 1))  # chains unchanged


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_tree_controllers_stay_lossless(target, draft, step_time, temperature):  # noqa: F811
    ps = prompts(5, seed=23)
    stacks = [
        ([TreeDraft(TREE)], None),
        ([TreeDraft(TREE)], GlobalTreeAllocation(MovingAverage(prior=0.6), step_time)),
        ([GoodputTree(step_time, MovingAverage(prior=0.7))], GlobalTreeAllocation(MovingAverage(prior=0.6), step_time)),
    ]
    outputs = []
    for n, (schedule, verify) in enumerate(stacks):
        engine = make_engine(target, draft)
        ids = [engine.add_request(p, SamplingParams(12, temperature=temperature, seed=i)) for i, p in enumerate(ps)]
        records: list[StepRecord] = []
        loop = ControlLoop(engine, schedule=schedule, verify=verify)
        results = loop.run(on_step=records.append)
        assert not loop.fallbacks
        assert any(int(r.drafts.draft_len.sum()) > 0 for r in records)
        if n < 2:
            assert any(r.drafts.parents is not None and int(r.drafts.draft_len.sum()) > 3 for r in records)
        outputs.append([results[i].output_ids for i in ids])
    if temperature == 0:
        reference = [greedy_reference(target, p, 12) for p in ps]
        assert all(o == reference for o in outputs)


class CheapVerification:
    """A step time where verified tokens cost almost nothing: every accepted node pays."""

    def predict(self, shapes: list) -> np.ndarray:
        return np.array([0.02 + 1e-5 * s.verify_computed for s in shapes])


def test_tree_oracle_verifies_what_the_target_accepts(target, draft):
    """Greedy: the oracle accepts exactly what verifying whole trees accepts, verifying less."""
    ps = prompts(4, seed=33)
    totals = []
    for use_oracle in (False, True):
        engine = make_engine(target, draft)
        ids = [engine.add_request(p, SamplingParams(12)) for p in ps]
        records: list[StepRecord] = []
        loop = ControlLoop(
            engine, schedule=TreeDraft(TREE), verify=oracle(engine, CheapVerification()) if use_oracle else None
        )
        results = loop.run(on_step=records.append)
        assert not loop.fallbacks
        assert [results[i].output_ids for i in ids] == [greedy_reference(target, p, 12) for p in ps]
        for r in records:
            if r.outcome.path is not None:  # every accepted node was verified
                last_on_path = (r.outcome.path * torch.arange(1, r.outcome.path.shape[1] + 1)).amax(1)
                assert bool((r.verify_len >= last_on_path).all())
        totals.append(
            (sum(int(r.outcome.accepted.sum()) for r in records), sum(int(r.verify_len.sum()) for r in records))
        )
    (full_acc, full_verified), (oracle_acc, oracle_verified) = totals
    assert oracle_acc == full_acc > 0
    assert oracle_verified < full_verified


def test_tree_labels(target, draft):
    engine = make_engine(target, draft)
    for p in prompts(3, seed=4):
        engine.add_request(p, SamplingParams(10))
    loop = ControlLoop(engine, schedule=TreeDraft(TREE))
    seen = 0
    while engine.has_unfinished():
        r = loop.step()
        if r.drafts.parents is None or not len(r.outcome.request_ids):
            continue
        observed, label = acceptance_labels(r)
        assert bool((label[~observed] <= 1).all())
        # the accepted nodes are exactly the observed nodes labelled 1
        assert torch.equal(observed & (label > 0), r.outcome.path)
        levels, level_label = level_labels(r)
        assert torch.equal((levels & (level_label > 0)).sum(1), r.outcome.accepted)
        seen += 1
    assert seen > 0


def test_adaserve_over_trees_is_lossless_and_drafts_trees(target, draft):
    """Where verification is nearly free (a GPU's regime) trees pay, and SLODraftLength drafts
    them (priced as trees: on this test's CPU-like `step_time`, two verified nodes a level cost
    more than a level adds, and it drafts none); AdaServe's selection over them is lossless."""

    class Cheap:
        def predict(self, shapes: list) -> np.ndarray:
            return np.array([0.03 + 1e-4 * s.verify_computed for s in shapes])

    ps = prompts(4, seed=43)
    engine = make_engine(target, draft)
    ids = [
        engine.add_request(p, SamplingParams(12), slo=SLO(tpot_s=0.015 if i % 2 else None)) for i, p in enumerate(ps)
    ]
    schedule = SLODraftLength(Cheap(), MovingAverage(prior=0.8), tree_width=2)
    records: list[StepRecord] = []
    loop = ControlLoop(engine, schedule=schedule, verify=AdaServe(MovingAverage(prior=0.5), Cheap()))
    results = loop.run(on_step=records.append)
    assert not loop.fallbacks
    assert any(r.drafts.parents is not None and int(r.drafts.draft_len.sum()) > 0 for r in records)
    assert [results[i].output_ids for i in ids] == [greedy_reference(target, p, 12) for p in ps]


def test_goodput_tree_picks_trees_when_verification_is_cheap_and_nothing_when_busy(step_time):  # noqa: F811
    from adactl.runtime import RequestView

    def state(rows: int) -> ScheduleState:
        views = tuple(RequestView(f"r{i}", "running", 40, 40, 10, 50, 0.0, 0.1, SamplingParams()) for i in range(rows))
        return ScheduleState(now=1.0, requests=views, max_draft_len=4)

    class Cheap:
        def predict(self, shapes: list) -> np.ndarray:  # verification nearly free: the widest, deepest pays
            return np.array([0.05 + 1e-5 * s.verify_computed for s in shapes])

    class Busy:
        def predict(self, shapes: list) -> np.ndarray:  # every verified token costs a lot
            return np.array([0.05 + 0.01 * s.verify_computed for s in shapes])

    plan = GoodputTree(Cheap(), MovingAverage(prior=0.5)).act(state(2))
    assert plan.tree == TreeSpec(4, 2, 8) and plan.draft_len == 0
    plan = GoodputTree(Busy(), MovingAverage(prior=0.5)).act(state(32))
    assert plan.tree is None and plan.draft_len == 0


def test_tree_levels_learn_on_from_the_prior_that_priced_trees(target, draft):
    """`TreeLevels` (goodput-tree's and slo-tree's tree acceptance): its first tree step moves
    the estimate from the prior trees were chosen on by one step's weight. Started from a flat
    0.5 instead, one width-4 tree step priced trees below the chain (0.57) for good, and
    `goodput-tree` never drafted another in the H100 replay."""
    from adactl.controllers import TreeDraft
    from adactl.controllers.trees import TreeLevels

    engine = make_engine(target, draft)
    for p in prompts(4, seed=42):
        engine.add_request(p, SamplingParams(12))
    steps: list[StepRecord] = []
    ControlLoop(engine, schedule=TreeDraft(TreeSpec(3, 4, 12))).run(on_step=steps.append)
    first = next(r for r in steps if r.drafts.parents is not None and int(r.drafts.draft_len.sum()) > 0)
    levels = TreeLevels(width=4, decay=MovingAverage().decay)
    chain = torch.full((3,), 0.57)
    prior = levels.alpha(chain)
    assert torch.allclose(prior, torch.full((3,), 1 - 0.43 * 0.49), atol=1e-3)  # width 4: sibling prior 0.51
    assert not any(levels.update(r) for r in steps[: steps.index(first)])  # steps with no tree node teach nothing
    assert levels.update(first) and levels.seen
    moved = (levels.alpha(chain) - prior).abs()
    rows = len(first.drafts.request_ids)
    assert float(moved.max()) <= rows / (25 + rows) + 1e-6  # one step's weight, from the prior (strength 25)


def test_extra_nodes_keep_more_of_the_growth_and_are_priced():
    """`extra_nodes` (`--tree-extra-nodes`): the goodput trees keep `width` nodes a level and
    that many more, at most the whole growth (a depth-1 tree has `width` nodes), and the step's
    verify width is priced as kept."""
    from adactl.controllers.trees import RequestGoodputTree, tree_nodes_kept, tree_of_depth, tree_shape

    assert [tree_nodes_kept(d, 4, 4) for d in (0, 1, 2, 3)] == [0, 4, 12, 16]
    assert [tree_nodes_kept(d, 2, 8) for d in (1, 2, 3)] == [2, 6, 10]  # the whole width-2 growth
    assert tree_of_depth(2, 4, 4) == TreeSpec(2, 4, 12) and tree_of_depth(2, 4) == TreeSpec(2, 4, 8)
    assert tree_shape([2, 2], 4, 0, 100, extra=4).verify_tokens == 2 * 13
    assert tree_shape([3], 1, 0, 100, extra=4).verify_tokens == 4  # a chain keeps its length
    with pytest.raises(ValueError, match="extra_nodes"):
        GoodputTree(Cheap(), MovingAverage(), width=4, extra_nodes=-1)
    with pytest.raises(ValueError, match="extra_nodes"):
        RequestGoodputTree(Cheap(), MovingAverage(), width=4, extra_nodes=-1)


class Cheap:
    def predict(self, shapes: list) -> np.ndarray:
        return np.array([0.05 + 1e-5 * s.verify_computed for s in shapes])


def test_bad_tree_plans_are_invalid_actions():
    state = ScheduleState(now=0.0, requests=(), max_draft_len=4)
    for bad in (TreeSpec(depth=5), TreeSpec(depth=-1), {"x": TreeSpec()}, "tree"):
        with pytest.raises(InvalidAction):
            check_plan(StepPlan(tree=bad), state)  # type: ignore[arg-type]
