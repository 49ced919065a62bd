"""Greedy speculative decoding must reproduce the target's own greedy decoding exactly."""

from __future__ import annotations

import pytest
import torch

from adactl.runtime import SamplingParams, StepPlan, run_to_completion

from .helpers import greedy_reference, make_engine, prompts, random_plan_runner

MAX_NEW = 24


@pytest.fixture(scope="module")
def references(target: torch.nn.Module) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): greedy_reference(target, p, MAX_NEW) for p in prompts(8, seed=3)}


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("draft_len", [0, 1, 4])
def test_fixed_draft_len_matches_generate(target, draft, references, batch, draft_len):
    engine = make_engine(target, draft)
    chosen = list(references)[:batch]
    ids = {engine.add_request(list(p), SamplingParams(max_new_tokens=MAX_NEW)): p for p in chosen}
    results = run_to_completion(engine, StepPlan(draft_len=draft_len))
    for rid, p in ids.items():
        assert results[rid].output_ids == references[p], f"batch {batch}, k={draft_len}, prompt {p}"


@pytest.mark.parametrize("draft_len", [0, 3])
def test_greedy_shortcut_reaches_the_rules_verdict(target, draft, draft_len):
    """An all-greedy batch verifying the same k on every row skips the verify rule
    (`TargetVerifier._greedy`); the same engine made to run the rule (a wrapper is not
    `verify_chains`) accepts, emits, caches and charges draws exactly alike, step by step."""
    from adactl.runtime import verify_chains

    engines = [make_engine(target, draft, seed=5), make_engine(target, draft, seed=5)]
    engines[1].target_verifier.verifier = lambda *args: verify_chains(*args)
    for e in engines:
        for p in prompts(3, seed=4):
            e.add_request(p, SamplingParams(max_new_tokens=MAX_NEW))
    accepted = 0
    for _ in range(12):
        fast, rule = (e.step(StepPlan(draft_len=draft_len)) for e in engines)
        assert torch.equal(fast.accepted, rule.accepted) and fast.emitted == rule.emitted
        accepted += int(fast.accepted.sum())
        for a, b in zip(engines[0].rows.running, engines[1].rows.running):
            assert a.draws == b.draws
        kv = [e.rows.target for e in engines]
        assert kv[0].n_cols == kv[1].n_cols and (kv[0].lengths == kv[1].lengths).all()
    assert draft_len == 0 or accepted > 0  # (drafts were accepted: the rollback ran on both)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_lengths_and_cuts_match_generate(target, draft, references, batch, seed):
    """Per-row, per-step draft lengths (0 included) and verify prefixes cut short."""
    engine = make_engine(target, draft)
    chosen = list(references)[:batch]
    ids = {engine.add_request(list(p), SamplingParams(max_new_tokens=MAX_NEW)): p for p in chosen}
    random_plan_runner(engine, seed=seed)
    results = {r.request_id: r for r in engine.pop_finished()}
    for rid, p in ids.items():
        assert results[rid].output_ids == references[p]


def test_draft_of_another_shape_matches_generate(target, other_draft, references):
    """A draft that almost never agrees (every draft rejected) still yields the target's tokens."""
    engine = make_engine(target, other_draft)
    ids = {engine.add_request(list(p), SamplingParams(max_new_tokens=MAX_NEW)): p for p in references}
    stats = {"accepted": 0, "verified": 0}
    while engine.has_unfinished():
        out = engine.step(StepPlan(draft_len=3))
        stats["accepted"] += int(out.accepted.sum())
        stats["verified"] += int(out.verified.sum())
    results = {r.request_id: r for r in engine.pop_finished()}
    assert stats["verified"] > 0
    for rid, p in ids.items():
        assert results[rid].output_ids == references[p]


def test_acceptance_is_real(target, draft):
    """The test draft is accepted often but not always, so both paths above were exercised."""
    engine = make_engine(target, draft)
    for p in prompts(8, seed=3):
        engine.add_request(p, SamplingParams(max_new_tokens=MAX_NEW))
    accepted = verified = 0
    while engine.has_unfinished():
        out = engine.step(StepPlan(draft_len=4))
        accepted += int(out.accepted.sum())
        verified += int(out.verified.sum())
    assert 0.2 < accepted / verified < 0.9


def test_small_prefill_budget_matches_generate(target, draft, references):
    """Chunked prefill (3 prompt tokens per step) interleaved with decoding."""
    engine = make_engine(target, draft)
    ids = {engine.add_request(list(p), SamplingParams(max_new_tokens=MAX_NEW)): p for p in references}
    random_plan_runner(engine, seed=5, budget=3)
    results = {r.request_id: r for r in engine.pop_finished()}
    for rid, p in ids.items():
        assert results[rid].output_ids == references[p]


def test_eos_stops_request(target):
    """A request stops at EOS (inclusive), as generate does."""
    engine = make_engine(target, None)
    eos = next(iter(engine.eos_ids))
    # find a prompt whose greedy continuation hits EOS within 40 tokens
    for p in prompts(200, seed=11):
        ref = greedy_reference(target, p, 40)
        if eos in ref:
            break
    else:
        pytest.skip("no prompt reaches EOS")
    rid = engine.add_request(p, SamplingParams(max_new_tokens=40))
    result = run_to_completion(engine)[rid]
    assert result.finish_reason == "eos"
    assert result.output_ids == ref[: ref.index(eos) + 1]
