"""The draft's catch-up: a step that drafts after a stretch without drafting first feeds the
draft every token its rows emitted meanwhile (`runtime.shapes.catchup_of`). The engine and the
replay count it alike, the step-cost basis prices it, and `goodput`, `goodput-tree` and
`goodput-req` pay it once, not on every step they would draft."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from adactl.controllers import GoodputLength, GoodputTree, RequestGoodput
from adactl.estimators import MovingAverage, StepShape
from adactl.estimators.step_cost import BASIS, features, fit_theta
from adactl.interface import AcceptanceEstimate, ScheduleState
from adactl.runtime import RequestView, SamplingParams, StepPlan
from adactl.runtime.replay import ReplayEngine
from adactl.runtime.shapes import catchup_of

from .helpers import make_engine


class LagCost:
    """A step costs 20 ms, 35% more if it drafts, and 30 us a catch-up column (the 2-core CPU's
    figure for the default pair): k = 1 at alpha 0.5 gives 11% more tokens a second than plain
    decoding, before its catch-up."""

    def predict(self, shapes: list[StepShape]) -> np.ndarray:
        return np.array([0.02 * (1 + 0.35 * (s.max_draft > 0)) + 3e-5 * s.catchup_tokens for s in shapes])


def test_the_engine_and_the_replay_count_the_same_catch_up(target, draft):
    """Plain steps grow a row's lag one a step; a drafting step feeds it (padded to the
    longest), and leaves one (nothing accepted here: every cut is 0); a row that waits a step
    does not grow. The engine reports the columns (`StepOutcome.catchup_tokens`), the replay
    counts the same on the same plans."""
    engine = make_engine(target, draft, max_batch_size=4, seed=0)
    replay = ReplayEngine(LagCost(), alpha=[0.6, 0.6])
    ids = []
    for i in range(3):
        sampling = SamplingParams(max_new_tokens=40, stop_on_eos=False)
        ids.append((engine.add_request([2 + i] * (8 + i), sampling), replay.add_request([2 + i] * (8 + i), sampling)))
    plans = [(0, None), (0, None), (0, None), (1, None), (0, [0]), (0, [0]), (2, None), (1, None), (0, [1, 2]),
             (1, [0, 1])]  # fmt: skip
    seen = []
    for k, which in plans:
        counts = []
        for side, e in enumerate((engine, replay)):
            run = None if which is None else [ids[i][side] for i in which]
            drafts = e.draft_step(StepPlan(draft_len=k, prefill_budget=64, run=run))
            counts.append(e.verify([0] * len(drafts.request_ids)).catchup_tokens)
        seen.append(tuple(counts))
    mine, theirs = zip(*seen)
    # lags 3 a row at step 4 (three tokens since the prompt's); at step 7 row 0 has 3, rows 1-2 one; then 1
    # each; at step 10, row 0 has 1 and row 1 has 2 (the step it ran alone)
    assert mine == (0, 0, 0, 3 * 2, 0, 0, 3 * 2, 0, 0, 2 * 1)
    assert theirs == mine
    views = {v.request_id: v.draft_lag for v in engine.requests()}
    assert [views[i] for i, _ in ids] == [1, 1, 2]
    assert catchup_of([]) == 0 and catchup_of([1, 1]) == 0 and catchup_of([3, 1]) == 4


def test_the_profile_basis_prices_a_catch_up_apart_from_a_draft():
    """Steps that draft alike but catch up on different stretches: the basis's catch-up term
    takes the difference (without it, a fit could only charge drafting itself)."""
    rng = np.random.default_rng(0)
    shapes, seconds = [], []
    for _ in range(60):
        rows, k, lag = int(rng.choice([1, 4, 16])), int(rng.integers(0, 4)), int(rng.choice([1, 2, 8, 32]))
        shape = StepShape.of_lengths([k] * rows, [k] * rows, context=rows * 100,
                                     catchup=catchup_of([lag] * rows) if k else 0)  # fmt: skip
        shapes.append(shape)
        seconds.append((0.0, 0.004 * (k > 0) + 0.002 * k + 3e-5 * shape.catchup_tokens, 0.02 + 0.001 * rows * (k + 1)))
    theta = fit_theta(shapes, np.array(seconds))
    lagging = StepShape.of_lengths([1] * 16, [1] * 16, context=1600, catchup=16 * 31)
    fresh = StepShape.of_lengths([1] * 16, [1] * 16, context=1600)

    draft = features([lagging, fresh]) @ theta[:, 1]
    assert "draft_catchup" in BASIS
    assert abs((draft[0] - draft[1]) - 3e-5 * 16 * 31) < 1e-3  # 15 ms of catch-up, priced


def _state(lag: int, left: int) -> ScheduleState:
    sampling = SamplingParams(max_new_tokens=left + 1)
    running = tuple(RequestView(f"r{i}", "running", 16, 16, 1, 17, 0.0, 0.1, sampling, draft_lag=lag)
                    for i in range(16))  # fmt: skip
    waiting = RequestView("w", "waiting", 16, 0, 0, 16, 0.0, None, sampling)
    return ScheduleState(1.0, (waiting, *running), max_draft_len=1)


def test_goodput_pays_a_catch_up_once_spread_over_the_steps_it_would_draft():
    """k = 1 is 11% faster than plain decoding once the draft has caught up. After 40 steps
    without drafting, the catch-up (16 rows x 39 columns, 19 ms: a plain step's worth) is worth
    paying for rows with 200 tokens to go, not for rows with 8: a step-by-step rate would charge
    it all to the next step, and never draft again after a long enough stretch."""
    ma = MovingAverage(prior=0.5)
    ctl = GoodputLength(LagCost(), ma, explore=0.0)
    for lag, left, drafts in ((1, 8, 1), (40, 8, 0), (40, 200, 1)):
        state = _state(lag, left)
        assert ctl.act(state, ma.estimate(state)).draft_len == drafts, (lag, left)


def test_goodput_tree_pays_a_catch_up_once_too():
    """`goodput-tree` prices the catch-up as `goodput` does: after 40 steps without drafting,
    rows with 4 tokens to go stay plain, rows with 200 draft again (chains here: width 1)."""
    ma = MovingAverage(prior=0.5)
    ctl = GoodputTree(LagCost(), ma, width=1)
    for lag, left, drafts in ((1, 4, 1), (40, 4, 0), (40, 200, 1)):
        assert ctl.act(_state(lag, left)).draft_len == drafts, (lag, left)


def test_goodput_req_prices_a_lagging_rows_catch_up_for_every_row_it_pads():
    """`goodput-req` too: after 40 steps without drafting, rows with 4 tokens to go stay plain
    and rows with 200 draft again. And one lagging row drafting beside caught-up ones pads
    their catch-up to its lag: the allocation leaves it out (its half a token is not worth
    padding 16 rows to 39 columns), while every caught-up row drafts."""
    ctl = RequestGoodput(LagCost(), explore=0.0)
    estimate = AcceptanceEstimate(torch.full((16, 1), 0.5))
    for lag, left, drafts in ((1, 4, 16), (40, 4, 0), (40, 200, 16)):
        plan = ctl.act(_state(lag, left), estimate)
        assert sum(plan.draft_len.values()) == drafts, (lag, left)
    state = _state(1, 20)
    running = [r for r in state.requests if r.status == "running"]
    lagging = replace(running[0], draft_lag=40)
    state = replace(state, requests=tuple(lagging if r is running[0] else r for r in state.requests))
    plan = ctl.act(state, estimate)
    assert plan.draft_len[lagging.request_id] == 0 and sum(plan.draft_len.values()) == 15
