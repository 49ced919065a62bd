"""Continuous batching: requests join and leave mid-batch without changing anyone's tokens."""

from __future__ import annotations

import gc
import random

import psutil
import pytest
import torch

from adactl.runtime import SamplingParams, StepPlan, run_to_completion

from .helpers import engine_with_references, greedy_reference, make_engine, prompts


def test_join_and_leave_mid_batch_match_running_alone(target, draft):
    rng = random.Random(0)
    ps = prompts(10, seed=21)
    lengths = [rng.randint(3, 30) for _ in ps]  # different lengths: requests leave at different steps
    alone = [greedy_reference(target, p, n) for p, n in zip(ps, lengths)]
    engine = make_engine(target, draft)
    ids: dict[str, int] = {}
    pending = list(range(len(ps)))
    step = 0
    while pending or engine.has_unfinished():
        if pending and (step % 3 == 0 or not engine.has_unfinished()):
            i = pending.pop(0)  # a request joins every third step
            ids[engine.add_request(ps[i], SamplingParams(max_new_tokens=lengths[i]))] = i
        running = [v.request_id for v in engine.requests() if v.status == "running"]
        engine.step(StepPlan(draft_len={r: rng.randint(0, 3) for r in running}))
        step += 1
    results = {r.request_id: r for r in engine.pop_finished()}
    for rid, i in ids.items():
        assert results[rid].output_ids == alone[i], f"request {i}"


def test_deferred_requests_keep_their_cache(target, draft):
    engine, ids, alone = engine_with_references(target, draft, 4, seed=8, max_new_tokens=16)
    step = 0
    while engine.has_unfinished():
        running = [v.request_id for v in engine.requests() if v.status == "running"]
        run = [r for r in running if (hash(r) + step) % 2 == 0] or running  # defer about half
        out = engine.step(StepPlan(draft_len=2, run=run))
        assert set(out.request_ids) <= set(run)
        step += 1
    results = {r.request_id: r for r in engine.pop_finished()}
    assert [results[r].output_ids for r in ids] == alone


def test_pack_between_steps_changes_no_token(target, draft):
    """`Engine.pack` drops the holes rejected drafts left (the profiler packs before each
    round); every request's output is what it generates alone, and it refuses mid-step."""
    engine, ids, alone = engine_with_references(target, draft, 4, seed=9, max_new_tokens=16)
    packed = 0
    while engine.has_unfinished():
        engine.step(StepPlan(draft_len=3))
        packed += engine.pack()
    assert packed  # the drafts left holes to drop
    results = {r.request_id: r.output_ids for r in engine.pop_finished()}
    assert [results[rid] for rid in ids] == alone
    engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=4))
    engine.draft_step(StepPlan(draft_len=2))
    with pytest.raises(RuntimeError, match="between steps"):
        engine.pack()
    engine.verify()


def test_cancel_frees_the_request_and_spares_the_rest(target, draft):
    engine, ids, alone = engine_with_references(target, draft, 3, seed=9, max_new_tokens=20)
    for _ in range(4):
        engine.step(StepPlan(draft_len=2))
    assert engine.cancel(ids[1])
    assert not engine.cancel("no-such-request")
    results = run_to_completion(engine, StepPlan(draft_len=2))
    assert results[ids[1]].finish_reason == "cancelled"
    assert alone[1][: len(results[ids[1]].output_ids)] == results[ids[1]].output_ids
    assert results[ids[0]].output_ids == alone[0] and results[ids[2]].output_ids == alone[2]
    assert engine.kv_bytes() == 0


def test_cancel_between_draft_and_verify(target, draft):
    engine = make_engine(target, draft)
    a, b = (engine.add_request(p, SamplingParams(max_new_tokens=10)) for p in prompts(2, seed=4))
    engine.step()
    engine.draft_step(StepPlan(draft_len=2))
    assert engine.cancel(a)
    out = engine.verify()
    assert out.finished[a] == "cancelled"
    assert [v.request_id for v in engine.requests()] == [b]


def test_kv_memory_returns_to_starting_level(target, draft):
    engine = make_engine(target, draft)
    assert engine.kv_bytes() == 0
    process = psutil.Process()
    rss = []
    for round_ in range(3):
        for p in prompts(16, seed=round_, max_len=40):
            engine.add_request(p, SamplingParams(max_new_tokens=30))
        peak = 0
        while engine.has_unfinished():
            engine.step(StepPlan(draft_len=3))
            peak = max(peak, engine.kv_bytes())
        engine.pop_finished()
        assert peak > 0
        assert engine.kv_bytes() == 0
        gc.collect()
        rss.append(process.memory_info().rss)
    assert rss[2] - rss[1] < 20 * 2**20  # no growth from round to round (no leak)


def test_a_reservation_outlives_the_first_prompts_and_never_reallocates(target, draft):
    """`Engine.reserve` on the CPU: the batch caches keep their capacity when the first prompts
    join an idle engine (the prefill caches used to be adopted in their place, reservation and
    all lost), so a run inside it never reallocates; tokens as the requests alone."""
    engine, ids, alone = engine_with_references(target, draft, 6, seed=3, max_new_tokens=20)
    engine.reserve(8, 160)
    grown = []
    for kv in (engine.rows.target, engine.rows.draft):
        assert kv is not None
        resize = kv._reallocate
        kv._reallocate = lambda rows, cols, _r=resize: (grown.append((rows, cols)), _r(rows, cols))  # type: ignore[method-assign]
    while engine.has_unfinished():
        engine.step(StepPlan(draft_len=3))
        assert engine.rows.target.reserved == (8, 160) and engine.rows.target.capacity == (8, 160)
    results = {r.request_id: r.output_ids for r in engine.pop_finished()}
    assert [results[r] for r in ids] == alone
    assert engine.rows.target.capacity == (8, 160)  # kept over the drain
    assert grown == []  # the batch caches never reallocated


def test_prefill_only_steps_and_budget(target):
    engine = make_engine(target, None)
    rid = engine.add_request(list(range(1, 41)), SamplingParams(max_new_tokens=5))
    seen, pairs = [], []
    while engine.has_unfinished():
        out = engine.step(StepPlan(prefill_budget=16))
        seen.append(out.prefill_tokens)
        pairs.append(out.prefill_attention)
    assert seen[:3] == [16, 16, 8]
    # a chunk attends to the prompt cached before it and causally to itself
    assert pairs[:3] == [16 * 17 // 2, 16 * 16 + 16 * 17 // 2, 32 * 8 + 8 * 9 // 2]
    (result,) = engine.pop_finished()
    assert result.request_id == rid and len(result.output_ids) == 5


def test_max_batch_size_queues_the_rest(target):
    engine = make_engine(target, None, max_batch_size=2)
    for p in prompts(5, seed=2):
        engine.add_request(p, SamplingParams(max_new_tokens=4))
    engine.step()
    statuses = [v.status for v in engine.requests()]
    assert statuses.count("running") == 2 and statuses.count("waiting") == 3
    assert len(run_to_completion(engine)) == 5


def test_outcome_reports_plain_data(target, draft):
    engine = make_engine(target, draft)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=8)) for p in prompts(3, seed=1)]
    first = engine.step(StepPlan(draft_len=2))
    assert first.prefill_tokens > 0 and set(first.emitted) == set(ids)  # first tokens
    # several prompts in one step: the sum of their attention, not the square of their total
    assert first.prefill_attention == sum(len(p) * (len(p) + 1) // 2 for p in prompts(3, seed=1))
    drafts = engine.draft_step(StepPlan(draft_len={ids[0]: 3, ids[1]: 0, ids[2]: 1}))
    assert drafts.tokens.shape[0] == 3 and drafts.probs.shape == (3, 3, 128)
    by_id = dict(zip(drafts.request_ids, drafts.draft_len.tolist()))
    assert by_id == {ids[0]: 3, ids[1]: 0, ids[2]: 1}
    assert torch.allclose(drafts.probs[drafts.draft_len > 0, 0].sum(-1), torch.ones(2))
    out = engine.verify([1, 0, 0])
    assert out.verified.tolist() == [1, 0, 0]
    assert all(1 <= len(out.emitted[r]) <= 2 for r in out.request_ids)
    assert out.total_s >= out.verify_s > 0


def test_prefill_groups_with_requests_done_at_first_token(target, draft):
    """Prompts of very different lengths (several prefill groups) mixed with one-token requests."""
    ps = [list(range(1, 60)), [5, 6], list(range(10, 40)), [7], list(range(3, 70)), [8, 9, 10]]
    lengths = [12, 1, 9, 1, 14, 1]
    alone = [greedy_reference(target, p, n) for p, n in zip(ps, lengths)]
    engine = make_engine(target, draft)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(ps, lengths)]
    results = run_to_completion(engine, StepPlan(draft_len=2, prefill_budget=1000))
    assert [results[r].output_ids for r in ids] == alone
    assert engine.kv_bytes() == 0


def test_request_joins_while_others_prefill_in_chunks(target, draft):
    ps = [list(range(1, 50)), list(range(20, 90)), [4, 5, 6]]
    alone = [greedy_reference(target, p, 10) for p in ps]
    engine = make_engine(target, draft)
    ids = [engine.add_request(ps[0], SamplingParams(max_new_tokens=10))]
    engine.step(StepPlan(draft_len=1, prefill_budget=100))
    ids += [engine.add_request(p, SamplingParams(max_new_tokens=10)) for p in ps[1:]]
    results = run_to_completion(engine, StepPlan(draft_len=1, prefill_budget=16))
    assert [results[r].output_ids for r in ids] == alone


def test_cancel_right_after_the_first_token(target, draft):
    """A request whose prompt finished in the step in flight can be cancelled before it joins."""
    engine = make_engine(target, draft)
    keep = engine.add_request([3, 4, 5], SamplingParams(max_new_tokens=6))
    engine.step()
    gone = engine.add_request([6, 7], SamplingParams(max_new_tokens=6))
    drafts = engine.draft_step(StepPlan(draft_len=2))  # `gone` is prefilled and emits its first token here
    assert gone not in drafts.request_ids
    assert engine.cancel(gone)
    out = engine.verify()
    assert out.finished[gone] == "cancelled" and len(out.emitted[gone]) == 1
    results = run_to_completion(engine)
    assert results[keep].output_ids == greedy_reference(target, [3, 4, 5], 6)
    assert engine.kv_bytes() == 0


def test_split_verify_matches_running_alone(target, draft, monkeypatch):
    """A few long drafts in a wide batch: the verify forward splits in two row ranges, and
    every request still gets exactly its tokens run alone, greedy and sampled."""
    from adactl.runtime import engine as engine_module
    from adactl.runtime.engine import verify_computed, verify_split

    cut = torch.tensor([6, 5, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    assert verify_split(cut) == [(0, 2), (2, 12)]
    assert verify_computed(cut) == 2 * 7 + 10 * 2
    assert verify_split(torch.tensor([2, 2, 1, 2])) == [(0, 4)]  # too small to pay for a second forward

    engine, ids, alone = engine_with_references(target, draft, 12, seed=33, max_new_tokens=16)
    splits = 0
    while engine.has_unfinished():
        running = [v.request_id for v in engine.requests() if v.status == "running"]
        drafts = engine.draft_step(StepPlan(draft_len={r: 6 if i < 2 else 1 for i, r in enumerate(running)}))
        lens = drafts.draft_len.tolist()
        splits += len(verify_split(torch.tensor(lens))) == 2
        engine.verify(lens)
    results = {r.request_id: r for r in engine.pop_finished()}
    assert splits > 3
    assert [results[r].output_ids for r in ids] == alone

    # sampled rows with their own seeds: the same tokens whether the verify splits or not
    ps = prompts(12, seed=34)

    def sampled() -> list[list[int]]:
        e = make_engine(target, draft)
        rid = [e.add_request(p, SamplingParams(16, temperature=0.9, seed=i)) for i, p in enumerate(ps)]
        while e.has_unfinished():
            running = [v.request_id for v in e.requests() if v.status == "running"]
            d = e.draft_step(StepPlan(draft_len={r: 6 if i < 2 else 1 for i, r in enumerate(running)}))
            e.verify(d.draft_len)
        out = {r.request_id: r.output_ids for r in e.pop_finished()}
        return [out[r] for r in rid]

    split = sampled()
    monkeypatch.setattr(engine_module, "verify_split", lambda cut: [(0, len(cut))])
    assert sampled() == split
