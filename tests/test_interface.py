"""The estimate-then-act interface: controllers driven from hand-built states (no engine, as a
custom server would), and the control loop's fallbacks when controllers misbehave."""

from __future__ import annotations

import logging

import pytest
import torch

from adactl.controllers import ConfidenceStop, FixedDraftLength, NoSpeculation
from adactl.estimators import DraftConfidence, MovingAverage
from adactl.interface import (
    AcceptanceEstimate,
    Controller,
    InvalidAction,
    ScheduleController,
    ScheduleState,
    VerifyController,
    VerifyState,
    check_plan,
    check_verify_len,
)
from adactl.loop import ControlLoop
from adactl.runtime import DraftBatch, RequestView, SamplingParams, StepPlan

from .helpers import greedy_reference, make_engine, prompts


def view(rid: str, status: str = "running", generated: int = 3) -> RequestView:
    prefilled = 5 if status == "running" else 0
    return RequestView(rid, status, 5, prefilled, generated, 5 + generated, 0.0, None, SamplingParams())


def hand_drafts() -> DraftBatch:
    """Three rows drafting 3, 0 and 2 tokens over a 6-token vocabulary."""
    probs = torch.zeros(3, 3, 6)
    tokens = torch.full((3, 3), -1)
    confident = [[0.9, 0.5, 0.2], [0, 0, 0], [0.3, 0.8, 0]]
    for i, row in enumerate(confident):
        for j, p in enumerate(row):
            if p:
                tokens[i, j] = j + 1
                probs[i, j, j + 1] = p
                probs[i, j, 0] = 1 - p
    return DraftBatch(
        request_ids=("a", "b", "c"),
        tokens=tokens,
        draft_len=torch.tensor([3, 0, 2]),
        probs=probs,
        context_len=torch.tensor([8, 6, 9]),
        greedy=torch.tensor([True, True, False]),
    )


def test_controllers_run_on_hand_built_states():
    state = ScheduleState(now=1.0, requests=(view("a"), view("b"), view("w", "waiting", 0)), max_draft_len=4)
    assert isinstance(FixedDraftLength(3), ScheduleController)
    plan = FixedDraftLength(6).act(state, None)
    assert plan.draft_len == 4  # clipped to what the server can draft
    assert check_plan(plan, state) is plan

    stop = ConfidenceStop(0.4)
    assert isinstance(stop, VerifyController)
    vstate = VerifyState(now=1.0, drafts=hand_drafts())
    utilities = stop.estimator.estimate(vstate)
    assert isinstance(utilities, AcceptanceEstimate)
    torch.testing.assert_close(utilities.alpha, torch.tensor([[0.9, 0.5, 0.2], [0, 0, 0], [0.3, 0.8, 0]]))
    torch.testing.assert_close(utilities.survival[0], torch.tensor([0.9, 0.45, 0.09]))
    torch.testing.assert_close(utilities.expected_accepted()[0], torch.tensor([0.0, 0.9, 1.35, 1.44]))
    cut = stop.act(vstate, utilities)
    assert cut.tolist() == [2, 0, 0]  # row a stops before 0.2, row c before 0.3
    assert check_verify_len(cut, vstate.drafts).tolist() == [2, 0, 0]


def test_invalid_actions_are_named():
    state = ScheduleState(now=0.0, requests=(view("a"), view("w", "waiting", 0)), max_draft_len=4)
    with pytest.raises(InvalidAction, match="StepPlan"):
        check_plan({"draft_len": 2}, state)
    with pytest.raises(InvalidAction, match="draft lengths"):
        check_plan(StepPlan(draft_len=-1), state)
    with pytest.raises(InvalidAction, match="draft lengths"):
        check_plan(StepPlan(draft_len=9), state)
    with pytest.raises(InvalidAction, match="not running"):
        check_plan(StepPlan(draft_len={"w": 2}), state)
    with pytest.raises(InvalidAction, match="not waiting"):
        check_plan(StepPlan(admit=["a"]), state)
    drafts = hand_drafts()
    with pytest.raises(InvalidAction, match="3 integers"):
        check_verify_len([1, 0], drafts)
    with pytest.raises(InvalidAction, match="integers"):
        check_verify_len(torch.tensor([1.0, 0.0, 0.0]), drafts)
    with pytest.raises(InvalidAction, match="draft_len"):
        check_verify_len([1, 1, 0], drafts)  # row b drafted nothing


class Raises(Controller):
    def __init__(self, when: int = 0) -> None:
        self.calls, self.when = 0, when

    def act(self, state, utilities):
        self.calls += 1
        if self.calls > self.when:
            raise RuntimeError("controller bug")
        return state.plan


class ReturnsGarbage(Controller):
    def __init__(self, garbage) -> None:
        self.garbage = garbage

    def act(self, state, utilities):
        return self.garbage(state) if callable(self.garbage) else self.garbage


class BadEstimator:
    def estimate(self, state):
        return AcceptanceEstimate(torch.ones_like(state.drafts.probs[..., 0]))

    def update(self, record):
        raise ValueError("estimator bug")


def run_loop(target, draft, ps, **loop_kw) -> tuple[ControlLoop, dict]:
    engine = make_engine(target, draft)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=12)) for p in ps]
    loop = ControlLoop(engine, **loop_kw)
    results = loop.run()
    return loop, {i: results[i].output_ids for i in ids}


@pytest.mark.parametrize(
    "schedule,verify,fallback",
    [
        ([FixedDraftLength(3)], ConfidenceStop(0.4), None),
        ([FixedDraftLength(3), Raises(when=2)], None, "schedule:Raises"),
        ([ReturnsGarbage("not a plan")], None, "schedule:ReturnsGarbage"),
        ([ReturnsGarbage(StepPlan(draft_len=-2))], None, "schedule:ReturnsGarbage"),
        ([ReturnsGarbage(lambda s: StepPlan(draft_len={"nobody": 2}))], None, "schedule:ReturnsGarbage"),
        ([FixedDraftLength(3)], ReturnsGarbage([99]), "verify:ReturnsGarbage"),
        ([FixedDraftLength(3)], ReturnsGarbage(lambda s: s.drafts.draft_len + 1), "verify:ReturnsGarbage"),
        ([FixedDraftLength(2)], Raises(), "verify:Raises"),
    ],
)
def test_loop_is_lossless_and_falls_back_safely(target, draft, schedule, verify, fallback, caplog):
    """Whatever the controllers do, every request finishes with the target's own greedy
    output; a failing decision is replaced by the safe action and counted (logged once)."""
    ps = prompts(4, seed=3)
    with caplog.at_level(logging.WARNING, logger="adactl.loop"):
        loop, outputs = run_loop(target, draft, ps, schedule=schedule, verify=verify)
    for p, out in zip(ps, outputs.values()):
        assert out == greedy_reference(target, p, 12)
    if fallback is None:
        assert not loop.fallbacks
    else:
        assert loop.fallbacks[fallback] > 0 and set(loop.fallbacks) == {fallback}
        assert sum(fallback in r.message for r in caplog.records) == 1


def test_safe_schedule_means_no_speculation(target, draft):
    engine = make_engine(target, draft)
    engine.add_request(prompts(1, seed=5)[0], SamplingParams(max_new_tokens=6))
    loop = ControlLoop(engine, schedule=[FixedDraftLength(3), Raises()])
    record = loop.step()  # prefill
    record = loop.step()
    assert record.fallbacks == ("schedule:Raises",)
    assert record.plan.draft_len == 0 and int(record.drafts.draft_len.sum()) == 0


def test_failing_update_is_counted_and_serving_goes_on(target, draft):
    ps = prompts(3, seed=6)
    stop = ConfidenceStop(0.3, estimator=BadEstimator())
    ma = MovingAverage()
    loop, outputs = run_loop(target, draft, ps, schedule=FixedDraftLength(2), verify=stop, estimators=[ma])
    assert loop.fallbacks["update:BadEstimator"] > 0
    assert all(out == greedy_reference(target, p, 12) for p, out in zip(ps, outputs.values()))
    assert not torch.allclose(ma.mean[:2], torch.full((2,), 0.5))  # the healthy estimator still learned


def test_no_draft_model_means_no_speculation(target):
    ps = prompts(2, seed=8)
    loop, outputs = run_loop(target, None, ps, schedule=FixedDraftLength(3))
    assert loop.max_draft_len == 0 and loop.fallbacks == {}
    assert all(out == greedy_reference(target, p, 12) for p, out in zip(ps, outputs.values()))


def test_estimators_are_updated_once_per_step(target, draft):
    class Counting(DraftConfidence):
        n = 0

        def update(self, record):
            Counting.n += 1

    est = Counting()
    engine = make_engine(target, draft)
    engine.add_request(prompts(1, seed=2)[0], SamplingParams(max_new_tokens=8))
    loop = ControlLoop(engine, schedule=NoSpeculation(), verify=ConfidenceStop(estimator=est), estimators=[est])
    loop.run()
    assert Counting.n == loop.steps


def test_a_bare_controller_needs_no_estimator_or_update(target, draft):
    """Duck typing: an object with only `act` is a controller (no estimator, nothing learned)."""

    class Bare:
        def act(self, state, utilities):
            assert utilities is None
            return StepPlan(draft_len=2, prefill_budget=state.plan.prefill_budget)

    ps = prompts(2, seed=9)
    loop, outputs = run_loop(target, draft, ps, schedule=Bare())
    assert loop.fallbacks == {} and loop.steps > 0
    assert all(out == greedy_reference(target, p, 12) for p, out in zip(ps, outputs.values()))
