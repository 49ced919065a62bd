"""Bad input is rejected for that request (or call) alone; the others carry on unchanged."""

from __future__ import annotations

import math

import pytest

from adactl.runtime import RequestError, SamplingParams, StepPlan, run_to_completion

from .helpers import engine_with_references

BAD_REQUESTS = [
    ([], SamplingParams(), "prompt is empty"),
    (list(range(1, 600)), SamplingParams(), "context"),
    ([1, 2], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([1, 2], SamplingParams(max_new_tokens=-3), "max_new_tokens"),
    ([1, 2], SamplingParams(temperature=-0.5), "temperature"),
    ([1, 2], SamplingParams(temperature=math.nan), "temperature"),
    ([1, 2], SamplingParams(top_p=0.0), "top_p"),
    ([1, 2], SamplingParams(top_p=1.5), "top_p"),
    ([1, 2], SamplingParams(top_p=math.nan), "top_p"),
    ([1, 2], SamplingParams(seed=-1), "seed"),
    ([1, 100000], SamplingParams(), "vocabulary"),
    ([1, "a"], SamplingParams(), "token ids"),
    ("some text", SamplingParams(), "tokenizer"),
]


def test_bad_requests_rejected_while_others_run(target, draft):
    engine, ids, alone = engine_with_references(target, draft, 3, seed=6, max_new_tokens=20)
    engine.step(StepPlan(draft_len=2))
    for prompt, sampling, message in BAD_REQUESTS:
        with pytest.raises(RequestError, match=message):
            engine.add_request(prompt, sampling)  # type: ignore[arg-type]
        engine.step(StepPlan(draft_len=2))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request([1], request_id=ids[0])
    results = run_to_completion(engine, StepPlan(draft_len=2))
    assert [results[r].output_ids for r in ids] == alone


def test_bad_plans_and_cuts_raise_without_side_effects(target, draft):
    engine, ids, alone = engine_with_references(target, draft, 2, seed=7, max_new_tokens=12)
    engine.step()
    for plan, message in [
        (StepPlan(draft_len=-1), "draft lengths"),
        (StepPlan(prefill_budget=-5), "prefill_budget"),
        (StepPlan(run=["nope"]), "not running"),
        (StepPlan(admit=["nope"]), "not waiting"),
    ]:
        with pytest.raises(RequestError, match=message):
            engine.step(plan)
    drafts = engine.draft_step(StepPlan(draft_len=2))
    with pytest.raises(RequestError, match="outside"):
        engine.verify([3, 0])
    with pytest.raises(RequestError, match="entries"):
        engine.verify([1])
    with pytest.raises(RuntimeError, match="verify"):
        engine.draft_step()
    engine.verify(drafts.draft_len)  # the step is still pending and completes normally
    results = run_to_completion(engine, StepPlan(draft_len=2))
    assert [results[r].output_ids for r in ids] == alone


def test_vocabulary_mismatch_is_a_load_time_error(target):
    from adactl.runtime import Engine
    from adactl.runtime.models import tiny_llama

    with pytest.raises(ValueError, match="tokenizer"):
        Engine(target, tiny_llama(vocab_size=64))


def test_abort_all_starts_again_from_empty_caches(target, draft):
    from .helpers import greedy_reference, make_engine, prompts

    engine = make_engine(target, draft)
    for p in prompts(4, seed=3):
        engine.add_request(p, SamplingParams(max_new_tokens=12))
    engine.step(StepPlan(draft_len=2, prefill_budget=16))  # some prefilled, some waiting
    engine.step(StepPlan(draft_len=2))
    engine.draft_step(StepPlan(draft_len=3))  # a step left half done, as a failure would
    assert len(engine.abort_all()) == 4
    assert not engine.has_unfinished() and engine.kv_bytes() == 0 and engine.pop_finished() == []
    p = prompts(1, seed=9)[0]
    rid = engine.add_request(p, SamplingParams(max_new_tokens=12))
    while engine.has_unfinished():
        engine.step(StepPlan(draft_len=2))
    (result,) = engine.pop_finished()
    assert result.request_id == rid and result.output_ids == greedy_reference(target, p, 12)
