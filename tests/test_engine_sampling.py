"""Sampled outputs must follow the target's distribution (lossless rejection sampling).

The exact distribution of the 2nd and 3rd generated tokens of a tiny model is computed by
enumerating all continuations; the engine's samples (drafted with a very different draft)
are compared with a chi-square test. The same test with a wrong rule (always accept the
draft) must fail, which shows the bound can tell a wrong rule from the right one.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from adactl.runtime import Engine, EngineConfig, FeatureDraft, SamplingParams, StepPlan, VerifyResult, process_logits
from adactl.runtime import verify_chains as rejection_rule
from adactl.runtime.models import tiny_llama

VOCAB = 10
PROMPT = [3, 7, 2]
SAMPLES = 2000


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    target = tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=3, init_std=0.1)
    draft = tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=1, seed=4, init_std=0.1)
    return target, draft


def exact_marginals(model: torch.nn.Module, temperature: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """P(t2) and P(t3) under the processed target distribution, by enumeration."""
    temp, tp = torch.tensor([temperature]), torch.tensor([top_p])

    def next_dist(prefixes: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor(prefixes)).logits[:, -1]
        return process_logits(logits, temp.expand(len(prefixes)), tp.expand(len(prefixes))).double()

    p1 = next_dist([PROMPT])[0]  # [V]
    p2_given_1 = next_dist([PROMPT + [a] for a in range(VOCAB)])  # [V, V]
    pairs = list(itertools.product(range(VOCAB), repeat=2))
    p3_given_12 = next_dist([PROMPT + [a, b] for a, b in pairs]).view(VOCAB, VOCAB, VOCAB)
    joint12 = p1[:, None] * p2_given_1
    p2 = joint12.sum(0)
    p3 = (joint12[:, :, None] * p3_given_12).sum((0, 1))
    return p2.numpy(), p3.numpy()


def always_accept(target_logits, draft_probs, draft_tokens, verify_len, temperature, top_p, uniforms):
    """A wrong rule: every verified draft token passes, then a token from the target."""
    result = rejection_rule(target_logits, draft_probs, draft_tokens, verify_len, temperature, top_p, uniforms)
    rows = torch.arange(len(verify_len))
    bonus = result.next_token.clone()
    full = result.accepted == verify_len
    return VerifyResult(accepted=verify_len.clone(), next_token=torch.where(full, bonus, draft_tokens[rows, 0]))


def sampled_marginals(pair, rule, temperature: float, top_p: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    target, draft = pair
    engine = Engine(target, draft, config=EngineConfig(seed=seed, max_batch_size=SAMPLES), verifier=rule)
    sampling = SamplingParams(max_new_tokens=3, temperature=temperature, top_p=top_p, stop_on_eos=False)
    for _ in range(SAMPLES):
        engine.add_request(PROMPT, sampling)
    while engine.has_unfinished():
        engine.step(StepPlan(draft_len=2, prefill_budget=SAMPLES * len(PROMPT)))
    outputs = np.array([r.output_ids for r in engine.pop_finished()])
    assert outputs.shape == (SAMPLES, 3)
    return (np.bincount(outputs[:, 1], minlength=VOCAB), np.bincount(outputs[:, 2], minlength=VOCAB))


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected >= 5  # pool rare tokens into one bin so the chi-square approximation holds
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_samples_follow_target_distribution(pair, temperature, top_p):
    p2, p3 = exact_marginals(pair[0], temperature, top_p)
    c2, c3 = sampled_marginals(pair, rejection_rule, temperature, top_p, seed=0)
    assert chi_square_p(c2, p2) > 1e-3
    assert chi_square_p(c3, p3) > 1e-3


def test_wrong_rule_fails_the_same_bound(pair):
    p2, p3 = exact_marginals(pair[0], 1.0, 1.0)
    c2, c3 = sampled_marginals(pair, always_accept, 1.0, 1.0, seed=0)
    assert min(chi_square_p(c2, p2), chi_square_p(c3, p3)) < 1e-6


def test_seeded_request_samples_the_same_tokens_in_any_batch(pair):
    """A request's own seed fixes its draws: alone or among other sampled requests, same tokens."""
    target, draft = pair
    seeded = SamplingParams(max_new_tokens=20, temperature=1.0, seed=1234, stop_on_eos=False)

    def run(neighbours: int) -> list[int]:
        engine = Engine(target, draft, config=EngineConfig(seed=neighbours))
        rid = engine.add_request(PROMPT, seeded)
        for i in range(neighbours):
            engine.add_request([1 + i % 9, 2], SamplingParams(max_new_tokens=25, temperature=0.9, stop_on_eos=False))
        results = {r.request_id: r for r in engine_run(engine)}
        return results[rid].output_ids

    alone = run(0)
    assert run(5) == alone and run(11) == alone
    other_seed = Engine(target, draft)
    rid = other_seed.add_request(PROMPT, SamplingParams(**{**seeded.__dict__, "seed": 99}))
    assert {r.request_id: r for r in engine_run(other_seed)}[rid].output_ids != alone


def engine_run(engine: Engine) -> list:
    while engine.has_unfinished():
        engine.step(StepPlan(draft_len=2))
    return engine.pop_finished()


def test_feature_draft_with_reduced_vocabulary_samples_follow_target(pair):
    """A feature draft proposes only 7 of the 10 tokens; the other 3 must still come out as often
    as the target says (through the residual distribution)."""
    target = pair[0]
    draft = FeatureDraft.from_target(target, list(range(7)), intermediate_size=32, seed=5).eval()
    p2, p3 = exact_marginals(target, 1.0, 1.0)
    c2, c3 = sampled_marginals((target, draft), rejection_rule, 1.0, 1.0, seed=1)
    assert p2[7:].sum() > 0.05  # the test has teeth: tokens the draft never proposes are common
    assert chi_square_p(c2, p2) > 1e-3
    assert chi_square_p(c3, p3) > 1e-3


def fresh_draw_at_cut(target_logits, draft_probs, draft_tokens, verify_len, temperature, top_p, uniforms):
    """The rule without the test at the cut: past a cut, the next token is a fresh draw from p."""
    k = draft_tokens.shape[1]
    hidden = torch.arange(k)[None, :] >= verify_len[:, None]
    return rejection_rule(
        target_logits, draft_probs, draft_tokens.masked_fill(hidden, -1), verify_len, temperature, top_p, uniforms
    )


def confidence_cut_marginals(pair, rule, threshold: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Like `sampled_marginals`, but each row verifies its leading draft tokens whose own draft
    probability is at least `threshold` (a cut that looks at the drafted tokens)."""
    target, draft = pair
    engine = Engine(target, draft, config=EngineConfig(seed=seed, max_batch_size=SAMPLES), verifier=rule)
    sampling = SamplingParams(max_new_tokens=3, temperature=1.0, stop_on_eos=False)
    for _ in range(SAMPLES):
        engine.add_request(PROMPT, sampling)
    while engine.has_unfinished():
        d = engine.draft_step(StepPlan(draft_len=2, prefill_budget=SAMPLES * len(PROMPT)))
        own = d.probs.gather(-1, d.tokens.clamp(min=0)[..., None])[..., 0]
        confident = ((own >= threshold) & (d.tokens >= 0)).long().cumprod(1).sum(1)
        engine.verify(torch.minimum(confident, d.draft_len))
    outputs = np.array([r.output_ids for r in engine.pop_finished()])
    return (np.bincount(outputs[:, 1], minlength=VOCAB), np.bincount(outputs[:, 2], minlength=VOCAB))


def test_cuts_that_look_at_the_draft_stay_lossless(pair):
    """Verifying only confident draft tokens: the test at the cut keeps the output on the target's
    distribution, where a fresh draw past the cut skews it (the bound tells them apart)."""
    p2, p3 = exact_marginals(pair[0], 1.0, 1.0)
    c2, c3 = confidence_cut_marginals(pair, rejection_rule, 0.1, seed=0)
    assert min(chi_square_p(c2, p2), chi_square_p(c3, p3)) > 1e-3
    c2, c3 = confidence_cut_marginals(pair, fresh_draw_at_cut, 0.1, seed=0)  # measured p = 7e-6
    assert min(chi_square_p(c2, p2), chi_square_p(c3, p3)) < 1e-4
