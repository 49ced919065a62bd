"""Speculation controllers: their rules on hand-built states (as a custom server would call
them), the global search of Speculative Verification against brute force, and losslessness
in the control loop on tiny random Llamas."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from adactl.controllers import (
    BucketEMA,
    ConfidenceStop,
    FixedDraftLength,
    GoodputLength,
    HeuristicSchedule,
    SpeculativeVerification,
)
from adactl.controllers.bucket_ema import bucket
from adactl.estimators import MovingAverage, StepShape, StepTimeModel
from adactl.interface import AcceptanceEstimate, ScheduleState, StepRecord, VerifyState
from adactl.loop import ControlLoop
from adactl.runtime import DraftBatch, RequestView, SamplingParams, StepOutcome, StepPlan

from .helpers import greedy_reference, make_engine, prompts


def cost(s: StepShape) -> float:
    """A CPU-like step time: the verify forwards' tokens (padding included) plus drafting."""
    return 0.02 + 0.004 * s.verify_computed + 0.002 * s.max_draft + 0.0005 * s.draft_tokens


class ExactCost:
    """The step-time predictor interface with `cost` itself: isolates the search from the fit."""

    def predict(self, shapes: list[StepShape]) -> np.ndarray:
        return np.array([cost(s) for s in shapes])


@pytest.fixture(scope="module")
def step_time() -> StepTimeModel:
    """ExtraTrees fitted on `cost` at random shapes, as train/fit_estimators.py fits profiles."""
    rng = random.Random(0)
    shapes = []
    for _ in range(3000):
        rows, k = rng.choice([1, 2, 3, 4, 8, 16, 32, 64]), rng.randint(0, 8)
        cut = [rng.randint(0, k) for _ in range(rows)]
        shapes.append(StepShape.of_lengths(sorted(cut, reverse=True), [k] * rows, 0, rows * 100))
    y = np.array([[0.0, 0.0, cost(s)] for s in shapes])
    return StepTimeModel(n_estimators=30, min_samples_leaf=1).fit(shapes, y)


def view(rid: str, context: int = 50) -> RequestView:
    return RequestView(rid, "running", 40, 40, context - 40, context, 0.0, 0.1, SamplingParams())


def drafts_for(survival_rows: list[list[float]]) -> tuple[DraftBatch, AcceptanceEstimate]:
    b, k = len(survival_rows), max(len(r) for r in survival_rows)
    alpha = torch.zeros(b, k)
    for i, row in enumerate(survival_rows):
        prev = 1.0
        for j, s in enumerate(row):
            alpha[i, j] = s / prev if prev > 0 else 0.0
            prev = s
    lens = torch.tensor([len(r) for r in survival_rows])
    tokens = torch.where(torch.arange(k)[None] < lens[:, None], torch.ones(b, k, dtype=torch.long), -1)
    drafts = DraftBatch(
        tuple(f"r{i}" for i in range(b)), tokens, lens, torch.zeros(b, k, 4), torch.full((b,), 100),
        torch.ones(b, dtype=torch.bool),
    )  # fmt: skip
    return drafts, AcceptanceEstimate(alpha)


def objective(cut: list[int], est: AcceptanceEstimate, drafts: DraftBatch) -> float:
    surv = est.survival
    tokens = sum(1 + float(surv[i, :v].sum()) for i, v in enumerate(cut))
    shape = StepShape.of_lengths(cut, drafts.draft_len, 0, int(drafts.context_len.sum()))
    return tokens / cost(shape)


@pytest.mark.parametrize("seed", range(5))
def test_sv_finds_the_global_optimum_of_random_batches(seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(4):
        k, s = rng.randint(0, 4), 1.0
        row = []
        for _ in range(k):
            s *= rng.choice([0.2, 0.6, 0.9, 0.99])
            row.append(s)
        rows.append(row)
    if all(not r for r in rows):
        rows[0] = [0.9]
    drafts, est = drafts_for(rows)
    sv = SpeculativeVerification(estimator=None, step_time=ExactCost())  # type: ignore[arg-type]
    cut = sv.act(VerifyState(0.0, drafts), est)
    assert bool((cut >= 0).all()) and bool((cut <= drafts.draft_len).all())
    best = max(objective(list(c), est, drafts) for c in itertools.product(*[range(len(r) + 1) for r in rows]))
    assert objective(cut.tolist(), est, drafts) >= 0.95 * best


def test_sv_verifies_what_pays(step_time):
    drafts, est = drafts_for([[0.99, 0.98, 0.97, 0.96]] * 2)
    sv = SpeculativeVerification(estimator=None, step_time=step_time)  # type: ignore[arg-type]
    assert sv.act(VerifyState(0.0, drafts), est).tolist() == [4, 4]
    drafts, est = drafts_for([[0.02, 0.001, 0.0, 0.0]] * 2)
    assert sv.act(VerifyState(0.0, drafts), est).tolist() == [0, 0]


def test_goodput_length_follows_the_load(step_time):
    ma = MovingAverage(prior=0.8)
    ctl = GoodputLength(step_time, ma, margin=0.0)  # the plain argmax
    small = ScheduleState(0.0, (view("a"),), max_draft_len=8)
    large = ScheduleState(0.0, tuple(view(f"r{i}") for i in range(64)), max_draft_len=8)
    k_small = ctl.act(small, ma.estimate(small)).draft_len
    k_large = ctl.act(large, ma.estimate(large)).draft_len
    assert isinstance(k_small, int) and k_small >= 3
    assert k_large < k_small
    # with the default 3% margin a longer draft must clearly pay: never longer than the argmax
    k_margin = GoodputLength(step_time, ma).act(small, ma.estimate(small)).draft_len
    assert isinstance(k_margin, int) and 1 <= k_margin <= k_small
    poor = MovingAverage(prior=0.05)
    assert GoodputLength(step_time, poor).act(small, poor.estimate(small)).draft_len == 0


def outcome(ids, drafted, accepted, finished=()) -> StepOutcome:
    return StepOutcome(tuple(ids), torch.tensor(drafted), torch.tensor(drafted), torch.tensor(accepted), {},
                       {f: "eos" for f in finished}, 0, 0.0, 0.0, 0.0)  # fmt: skip


def record_of(o: StepOutcome) -> StepRecord:
    state = ScheduleState(0.0, (), 8)
    n = len(o.request_ids)
    drafts = DraftBatch(o.request_ids, torch.zeros(n, 0, dtype=torch.long), o.drafted, torch.zeros(0),
                        torch.zeros(n), torch.ones(n, dtype=torch.bool))  # fmt: skip
    return StepRecord(state, StepPlan(), drafts, o.verified, o)


def test_heuristic_schedule_is_plus_two_minus_one():
    h = HeuristicSchedule(initial=4, max_len=8)
    state = ScheduleState(0.0, (view("a"), view("b")), max_draft_len=8)
    assert h.act(state).draft_len == {"a": 4, "b": 4}
    h.update(record_of(outcome(["a", "b"], [4, 4], [4, 1])))
    assert h.act(state).draft_len == {"a": 6, "b": 3}
    for _ in range(3):
        h.update(record_of(outcome(["a", "b"], [6, 3], [6, 0])))
    assert h.k == {"a": 8, "b": 1}
    h.update(record_of(outcome(["a"], [8], [8], finished=["a"])))
    assert "a" not in h.k


def test_bucket_ema_tracks_accepted_length_per_bucket():
    assert [bucket(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    e = BucketEMA(initial=2.0, decay=0.5)
    big = ScheduleState(0.0, tuple(view(f"r{i}") for i in range(30)), max_draft_len=8)
    one = ScheduleState(0.0, (view("a"),), max_draft_len=8)
    for _ in range(6):
        e.update(record_of(outcome([f"r{i}" for i in range(30)], [3] * 30, [0] * 30)))
    assert e.act(big).draft_len == 1 and e.act(one).draft_len == 3  # bucket 1 still at its initial level


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_adaptive_controllers_stay_lossless(target, draft, step_time, temperature):
    ps = prompts(5, seed=21)
    controllers = [
        ([HeuristicSchedule()], ConfidenceStop(0.3)),
        ([BucketEMA()], SpeculativeVerification(MovingAverage(prior=0.6), step_time)),
        ([GoodputLength(step_time)], None),
        ([FixedDraftLength(4)], SpeculativeVerification(MovingAverage(prior=0.6), step_time)),
    ]
    outputs = []
    for schedule, verify in controllers:
        engine = make_engine(target, draft)
        ids = [engine.add_request(p, SamplingParams(12, temperature=temperature, seed=i)) for i, p in enumerate(ps)]
        loop = ControlLoop(engine, schedule=schedule, verify=verify)
        results = loop.run()
        assert not loop.fallbacks
        outputs.append([results[i].output_ids for i in ids])
    if temperature == 0:
        assert outputs[0] == [greedy_reference(target, p, 12) for p in ps]
    assert all(o == outputs[0] for o in outputs) or temperature > 0


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_peeking_changes_nothing_and_the_oracle_wastes_no_greedy_verification(target, draft, temperature):
    from adactl.controllers import oracle

    ps = prompts(4, seed=31)
    outputs, wasted = [], []
    for use_oracle in (False, True):
        engine = make_engine(target, draft)
        ids = [engine.add_request(p, SamplingParams(12, temperature=temperature, seed=i)) for i, p in enumerate(ps)]
        records: list[StepRecord] = []
        verify = oracle(engine, ExactCost()) if use_oracle else None
        loop = ControlLoop(engine, schedule=FixedDraftLength(4), verify=verify)
        results = loop.run(on_step=records.append)
        assert not loop.fallbacks
        outputs.append([results[i].output_ids for i in ids])
        wasted.append(sum(int((r.verify_len - r.outcome.accepted).sum()) for r in records))
        if use_oracle:
            assert verify.estimator.seconds > 0  # type: ignore[union-attr]
    if temperature == 0:
        assert outputs[0] == outputs[1] == [greedy_reference(target, p, 12) for p in ps]
        assert wasted[0] > 0 and wasted[1] == 0  # it verifies exactly what the target accepts
    else:
        assert wasted[1] < wasted[0]


def test_peek_leaves_the_step_as_it_was(target, draft):
    """Seeded sampled requests give the same tokens whether or not the target was peeked at."""
    ps = prompts(3, seed=32)
    outs = []
    for peek in (False, True):
        engine = make_engine(target, draft)
        ids = [engine.add_request(p, SamplingParams(10, temperature=1.0, seed=i)) for i, p in enumerate(ps)]
        while engine.has_unfinished():
            engine.draft_step(StepPlan(draft_len=3))
            if peek:
                probs = engine.peek_target()
                torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
            engine.verify()
        done = {r.request_id: r.output_ids for r in engine.pop_finished()}
        outs.append([done[i] for i in ids])
    assert outs[0] == outs[1]


def test_verify_controllers_accept_steps_without_drafts(step_time):
    """A prefill-only step (no decode rows) or one where nobody drafted: verify nothing."""
    for b, k in ((0, 0), (2, 0), (2, 3)):
        drafts = DraftBatch(tuple(f"r{i}" for i in range(b)), torch.full((b, k), -1), torch.zeros(b, dtype=torch.long),
                            torch.zeros(b, k, 4), torch.full((b,), 10), torch.ones(b, dtype=torch.bool))  # fmt: skip
        est = AcceptanceEstimate(torch.zeros(b, k))
        for ctl in (ConfidenceStop(0.4), SpeculativeVerification(MovingAverage(), step_time)):
            assert ctl.act(VerifyState(0.0, drafts), est).tolist() == [0] * b


def slo_view(rid: str, tpot: float | None, generated: int, since_first: float, now: float = 10.0) -> RequestView:
    from adactl.runtime import SLO

    slo = SLO(tpot_s=tpot) if tpot else None
    return RequestView(rid, "running", 40, 40, generated, 40 + generated, 0.0, now - since_first, SamplingParams(), slo)


def test_adaserve_spends_verification_on_requests_behind_their_slo():
    from adactl.controllers import AdaServe

    # survival too low for verification to pay on throughput alone
    drafts, est = drafts_for([[0.15, 0.02, 0.003, 0.0005]] * 2)
    sv = SpeculativeVerification(estimator=None, step_time=ExactCost())  # type: ignore[arg-type]
    assert sv.act(VerifyState(10.0, drafts), est).tolist() == [0, 0]
    # r0 is behind: 21 tokens in 1.0 s against a 0.047 s TPOT, so it needs about 1.14 tokens
    # this step: the first draft token (1.15 expected) is enough; r1 has no SLO, and since the
    # verify forward is [rows, longest] here, verifying r1's first token costs nothing more
    requests = (slo_view("r0", 0.047, 21, 1.0), slo_view("r1", None, 20, 1.0))
    ada = AdaServe(estimator=None, step_time=ExactCost())  # type: ignore[arg-type]
    assert ada.act(VerifyState(10.0, drafts, requests), est).tolist() == [1, 1]
    # hopelessly behind (needs 3 tokens, no prefix gives that): no verification is spent on it
    hopeless = (slo_view("r0", 0.045, 20, 1.0), slo_view("r1", None, 20, 1.0))
    assert ada.act(VerifyState(10.0, drafts, hopeless), est).tolist() == [0, 0]
    # on track with room to spare: nothing to buy, it chooses like SV
    relaxed = (slo_view("r0", 1.0, 20, 1.0), slo_view("r1", None, 20, 1.0))
    assert ada.act(VerifyState(10.0, drafts, relaxed), est).tolist() == [0, 0]


def test_adaserve_keeps_a_request_it_cannot_catch_up_at_its_pace():
    """A request too far behind for any prefix to bring it back this step still gets the
    shortest prefix that keeps its pace (1 + E(v) >= T / s, T the candidate's own step), where
    throughput alone verifies nothing; not when plain decoding keeps the pace, nor when no
    prefix does."""
    from adactl.controllers import AdaServe

    class Dear:  # a fixed step cost and a dear verify column: 0.1 s per row and position
        def predict(self, shapes: list[StepShape]) -> np.ndarray:
            return np.array([0.8 + 0.1 * sh.verify_computed for sh in shapes])

    drafts, est = drafts_for([[0.3, 0.06, 0.01, 0.001], [0.0, 0.0, 0.0, 0.0]])
    sv = SpeculativeVerification(estimator=None, step_time=Dear())  # type: ignore[arg-type]
    assert sv.act(VerifyState(10.0, drafts), est).tolist() == [0, 0]  # 2.3 tokens in 1.2 s < 2 in 1.0 s
    plain, one = sv.seconds(drafts, torch.tensor([[0, 0], [1, 0]]))
    assert 1.15 * plain < one < 1.3 * plain  # dearer than r0's token pays for, within reach of its pace
    ada = AdaServe(estimator=None, step_time=Dear())  # type: ignore[arg-type]

    def verified(tpot: float) -> list[int]:  # r0: 20 tokens in 40 s, far behind any such TPOT
        requests = (slo_view("r0", tpot, 20, 40.0), slo_view("r1", None, 20, 1.0))
        return ada.act(VerifyState(10.0, drafts, requests), est).tolist()

    assert verified(0.5 * (plain + one / 1.3))[0] == 1  # plain decoding falls behind pace; one token keeps it
    assert verified(1.05 * plain) == [0, 0]  # plain decoding keeps the pace
    assert verified(0.5 * plain) == [0, 0]  # no prefix keeps it: nothing is spent


def test_slo_draft_length_drafts_for_requests_that_need_it():
    from adactl.controllers import SLODraftLength

    ma = MovingAverage(prior=0.5)  # alpha 0.5 per position: 1 + G(c) = 1.5, 1.75, 1.875, ...
    ctl = SLODraftLength(ExactCost(), ma)
    # 64 requests: drafting does not pay on throughput (the goodput length is 0)
    loose = tuple(slo_view(f"r{i}", 1.0, 20, 1.0) for i in range(64))
    state = ScheduleState(10.0, loose, max_draft_len=8)
    assert set(ctl.act(state, ma.estimate(state)).draft_len.values()) == {0}  # type: ignore[union-attr]
    # r0 on a tight SLO that one token per plain step misses: it alone drafts, and since the
    # verify forward splits, its draft costs the step little; 1.5 expected tokens keep it on
    t0 = cost(StepShape.of_lengths([0] * 64, [0] * 64, 0, 64 * 60))
    state = ScheduleState(10.0, (slo_view("r0", t0 / 1.2, 0, 0.0), *loose[1:]), max_draft_len=8)
    plan = ctl.act(state, ma.estimate(state)).draft_len
    assert plan["r0"] == 1 and all(plan[f"r{i}"] == 0 for i in range(1, 64))  # type: ignore[index]
    # tighter: two draft tokens (1.75 expected); out of reach of any draft: none
    state = ScheduleState(10.0, (slo_view("r0", t0 / 1.6, 0, 0.0), *loose[1:]), max_draft_len=8)
    assert ctl.act(state, ma.estimate(state)).draft_len["r0"] == 2  # type: ignore[index]
    state = ScheduleState(10.0, (slo_view("r0", t0 / 3, 0, 0.0), *loose[1:]), max_draft_len=8)
    assert ctl.act(state, ma.estimate(state)).draft_len["r0"] == 0  # type: ignore[index]


def test_slo_draft_length_over_trees_counts_and_prices_tree_levels():
    """With `tree_width` 2, a level is accepted where either alternative is (0.5 chain, 0.3
    sibling: 0.65 a level), so a tight request needs a shallower tree than chain, and one no
    chain keeps on its SLO gets a tree; every plan is priced as the trees it drafts (two
    verified nodes a level), not as chains of the same lengths."""
    from adactl.controllers import SLODraftLength

    class Priced(ExactCost):
        def __init__(self) -> None:
            self.shapes: list[StepShape] = []

        def predict(self, shapes: list[StepShape]) -> np.ndarray:
            self.shapes += shapes
            return super().predict(shapes)

    ma = MovingAverage(prior=0.5)
    loose = tuple(slo_view(f"r{i}", 1.0, 20, 1.0) for i in range(64))
    t0 = cost(StepShape.of_lengths([0] * 64, [0] * 64, 0, 64 * 60))

    def depth(width: int, tighter: float, priced: Priced | None = None) -> int:
        ctl = SLODraftLength(priced or ExactCost(), ma, tree_width=width)
        state = ScheduleState(10.0, (slo_view("r0", t0 / tighter, 0, 0.0), *loose[1:]), max_draft_len=8)
        plan = ctl.act(state, ma.estimate(state))
        return plan.tree["r0"].depth if plan.tree else plan.draft_len["r0"]  # type: ignore[index]

    assert (depth(1, 1.7), depth(2, 1.7)) == (3, 2)  # 1.875 chain against 2.07 tree tokens
    assert (depth(1, 2.0), depth(2, 2.0)) == (0, 3)  # no chain reaches 2.1; a depth-3 tree (2.34) does
    priced = Priced()
    depth(2, 2.0, priced)
    drafted = [sh.verify_tokens - sh.rows for sh in priced.shapes]
    assert max(drafted) > 0 and all(n % 2 == 0 for n in drafted)  # whole levels of two nodes


def test_slo_travels_with_the_request(target, draft):
    from adactl.runtime import SLO, RequestError

    engine = make_engine(target, draft)
    rid = engine.add_request([1, 2, 3], SamplingParams(4), slo=SLO(ttft_s=1.0, tpot_s=0.05))
    assert engine.requests()[0].slo == SLO(ttft_s=1.0, tpot_s=0.05)
    with pytest.raises(RequestError, match="tpot_s"):
        engine.add_request([1, 2], slo=SLO(tpot_s=-1.0))
    with pytest.raises(RequestError, match="SLO"):
        engine.add_request([1, 2], slo={"tpot_s": 0.1})  # type: ignore[arg-type]
    assert [v.request_id for v in engine.requests()] == [rid]  # the bad ones queued nothing


def test_adaserve_is_lossless_in_the_loop(target, draft, step_time):
    from adactl.controllers import AdaServe, SLODraftLength
    from adactl.runtime import SLO

    ps = prompts(4, seed=41)
    engine = make_engine(target, draft)
    ids = [
        engine.add_request(p, SamplingParams(12), slo=SLO(tpot_s=0.001 if i % 2 else None)) for i, p in enumerate(ps)
    ]
    schedule = SLODraftLength(step_time, MovingAverage(prior=0.5))
    loop = ControlLoop(engine, schedule=schedule, verify=AdaServe(MovingAverage(prior=0.5), step_time))
    results = loop.run()
    assert not loop.fallbacks
    assert [results[i].output_ids for i in ids] == [greedy_reference(target, p, 12) for p in ps]


def test_slo_trees_learn_their_level_acceptance_from_tree_steps(target, draft, step_time):
    """`SLODraftLength(tree_width=2)` learns its level acceptance from steps that drafted trees
    (not the chain average raised again); chain steps and empty trees teach it nothing, and
    once learned its tree levels, not the chain estimate, decide the depth."""
    from adactl.controllers import SLODraftLength, TreeDraft
    from adactl.runtime import TreeSpec

    def records(schedule) -> list[StepRecord]:
        engine = make_engine(target, draft)
        for p in prompts(4, seed=42):
            engine.add_request(p, SamplingParams(12))
        out: list[StepRecord] = []
        ControlLoop(engine, schedule=schedule).run(on_step=out.append)
        return out

    ctl = SLODraftLength(step_time, MovingAverage(prior=0.5), tree_width=2)
    tree = ctl.tree
    assert tree is not None
    assert tree.decay == MovingAverage().decay  # the chain's pace, and a chain with its own keeps it
    assert SLODraftLength(step_time, MovingAverage(decay=0.9), tree_width=2).tree.decay == 0.9  # type: ignore[union-attr]
    for r in records(FixedDraftLength(3)) + records(TreeDraft(TreeSpec(0, 0, 0))):
        ctl.update(r)
    assert not tree.seen and torch.equal(tree.average.mean, torch.full((16,), 0.5))
    for r in records(TreeDraft(TreeSpec(3, 2, 6))):
        ctl.update(r)
    assert tree.seen and not torch.equal(tree.average.mean[:3], torch.full((3,), 0.5))
    # a request behind its SLO, a chain estimate of 0.9: the learned tree levels decide
    t0 = cost(StepShape.of_lengths([0], [0], 0, 60))
    state = ScheduleState(10.0, (slo_view("r0", t0 / 1.5, 0, 0.0),), max_draft_len=8)
    chain = MovingAverage(prior=0.9).estimate(state)
    tree.average.mean[:] = 0.0  # trees never accepted: no depth helps
    assert ctl.act(state, chain).tree["r0"].depth == 0  # type: ignore[index]
    tree.average.mean[:] = 0.6  # a level accepted 60% of the time: 1.6 tokens from one level
    assert ctl.act(state, chain).tree["r0"].depth >= 1  # type: ignore[index]
