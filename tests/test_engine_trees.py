"""Token trees: drafting, one batched tree-masked verify forward, lossless acceptance.

Greedy tree decoding must reproduce the target's greedy decoding exactly, at batch > 1 with
mixed tree shapes, chains and rows that do not draft, and with verify cuts; sampled tree
decoding must follow the target's distribution (chi-square against exact enumeration, with a
wrong rule failing the same bound)."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from adactl.runtime import (
    FeatureDraft,
    RequestError,
    SamplingParams,
    StepPlan,
    TreeSpec,
    VerifyResult,
    verify_chains,
    verify_trees,
)
from adactl.runtime.models import perturbed_copy
from adactl.runtime.tree import RowTree
from adactl.runtime.types import node_depth

from .helpers import greedy_reference, make_engine, prompts
from .test_engine_sampling import PROMPT, SAMPLES, VOCAB, chi_square_p, exact_marginals

MAX_NEW = 20


@pytest.fixture(scope="module")
def references(target: torch.nn.Module) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): greedy_reference(target, p, MAX_NEW) for p in prompts(8, seed=5)}


def random_tree_plan(rng: random.Random, running: list[str]) -> StepPlan:
    """Per request: a tree of random shape, a chain (draft_len), or nothing."""
    trees, lens = {}, {}
    for r in running:
        kind = rng.choice(["tree", "tree", "chain", "none"])
        if kind == "tree":
            trees[r] = TreeSpec(depth=rng.randint(1, 4), width=rng.randint(1, 3), nodes=rng.randint(1, 10))
        elif kind == "chain":
            lens[r] = rng.randint(1, 4)
    return StepPlan(draft_len=lens, tree=trees)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("cut", [False, True])
def test_greedy_trees_match_generate(target, draft, references, batch, cut):
    engine = make_engine(target, draft)
    chosen = list(references)[:batch]
    ids = {engine.add_request(list(p), SamplingParams(max_new_tokens=MAX_NEW)): p for p in chosen}
    rng = random.Random(batch + 10 * cut)
    accepted = branched = 0
    while engine.has_unfinished():
        running = [v.request_id for v in engine.requests() if v.status == "running"]
        drafts = engine.draft_step(random_tree_plan(rng, running))
        if drafts.parents is not None:
            branched += int((node_depth(drafts.parents) < torch.arange(drafts.parents.shape[1])).sum())
        lens = drafts.draft_len.tolist()
        out = engine.verify([rng.randint(0, k) for k in lens] if cut else None)
        accepted += int(out.accepted.sum())
    results = {r.request_id: r for r in engine.pop_finished()}
    for rid, p in ids.items():
        assert results[rid].output_ids == references[p], f"batch {batch}, prompt {p}"
    assert accepted > 0  # acceptance paths ran
    assert branched > 0  # real trees, not only chains


def test_tree_accepts_more_than_its_chain(target, references):
    """The point of trees: with the same depth, siblings catch tokens the top-1 chain misses
    (a draft that agrees with the target less often than the shared one, where that matters)."""
    draft = perturbed_copy(target, noise=0.08, seed=2)

    def accepted_per_step(plan: StepPlan) -> float:
        engine = make_engine(target, draft)
        for p in references:
            engine.add_request(list(p), SamplingParams(max_new_tokens=MAX_NEW))
        acc = steps = 0
        while engine.has_unfinished():
            out = engine.step(plan)
            acc, steps = acc + int(out.accepted.sum()), steps + len(out.request_ids)
        return acc / steps

    chain = accepted_per_step(StepPlan(draft_len=3))
    tree = accepted_per_step(StepPlan(tree=TreeSpec(depth=3, width=3, nodes=12)))
    assert tree > chain * 1.05, (tree, chain)


def test_feature_draft_trees_match_generate(target, references):
    draft = FeatureDraft.from_target(target, list(range(128)), intermediate_size=64, seed=2).eval()
    engine = make_engine(target, draft)
    ids = {engine.add_request(list(p), SamplingParams(max_new_tokens=MAX_NEW)): p for p in references}
    rng = random.Random(3)
    while engine.has_unfinished():
        running = [v.request_id for v in engine.requests() if v.status == "running"]
        engine.step(random_tree_plan(rng, running))
    results = {r.request_id: r for r in engine.pop_finished()}
    for rid, p in ids.items():
        assert results[rid].output_ids == references[p]


def test_kv_returns_to_baseline_after_trees(target, draft):
    engine = make_engine(target, draft)
    for p in prompts(5, seed=9):
        engine.add_request(p, SamplingParams(max_new_tokens=12))
    while engine.has_unfinished():
        engine.step(StepPlan(tree=TreeSpec(depth=3, width=2, nodes=6)))
    engine.pop_finished()
    assert engine.kv_bytes() == 0 and engine.cached_tokens() == 0


def test_bad_tree_plans_are_refused_and_nothing_changes(target, draft):
    engine = make_engine(target, draft)
    rid = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=8))
    engine.step(StepPlan())
    for bad in (TreeSpec(depth=-1), TreeSpec(depth=2, width=0), {"nope": TreeSpec()}, {rid: "wide"}):
        with pytest.raises(RequestError):
            engine.draft_step(StepPlan(tree=bad))  # type: ignore[arg-type]
    out = engine.step(StepPlan(tree=TreeSpec()))  # still works
    assert out.request_ids == (rid,)


def test_tree_prefixes_are_trees_and_siblings_follow_draw_order():
    q = torch.tensor([0.5, 0.3, 0.15, 0.05])
    tree = RowTree(TreeSpec(depth=2, width=2, nodes=5), greedy=True)
    tree.propose(-1, q, torch.zeros(2))
    for node in tree.frontier(0):
        tree.propose(node, q, torch.zeros(2))
    kept = tree.best()
    assert len(kept) == 5
    for j, node_id in enumerate(kept):
        parent = tree.nodes[node_id].parent
        assert parent == -1 or parent in kept[:j]  # parents come first
    values = [tree.nodes[i].value for i in kept]
    assert values == sorted(values, reverse=True)
    assert [tree.nodes[i].token for i in kept[:2]] == [0, 1]


def test_tree_rule_equals_chain_rule_on_chains():
    """A one-child tree is a chain: same uniforms, same accepted counts and next tokens."""
    gen = torch.Generator().manual_seed(0)
    b, k, v = 64, 4, 6
    logits = torch.randn(b, k + 1, v, generator=gen)
    probs = torch.softmax(torch.randn(b, k, v, generator=gen), -1)
    tokens = torch.multinomial(probs.view(-1, v), 1, generator=gen).view(b, k)
    cut = torch.randint(0, k + 1, (b,), generator=gen)
    temp = torch.where(torch.rand(b, generator=gen) < 0.3, 0.0, 1.0)
    top_p = torch.ones(b)
    u = torch.rand(b, k + 1, generator=gen)
    parents = torch.arange(k)[None, :].expand(b, k) - 1
    chain = verify_chains(logits, probs, tokens, cut, temp, top_p, u)
    tree = verify_trees(logits, probs, tokens, parents, cut, temp, top_p, u)
    assert torch.equal(chain.accepted, tree.accepted)
    assert torch.equal(chain.next_token, tree.next_token)


def always_first_child(target_logits, draft_probs, draft_tokens, parents, verify_len, temperature, top_p, uniforms):
    """A wrong rule: the first child of each node passes, down to the verified depth."""
    res = verify_trees(target_logits, draft_probs, draft_tokens, parents, verify_len, temperature, top_p, uniforms)
    path = torch.zeros_like(res.path)
    for i in range(len(verify_len)):
        node = -1
        for j in range(int(verify_len[i])):
            if int(parents[i, j]) == node:
                path[i, j], node = True, j
    return VerifyResult(accepted=path.sum(1), next_token=res.next_token, path=path)


def mixed_plan(running: list[str]) -> StepPlan:
    """A third of the rows draft trees, a third chains, a third nothing."""
    trees = {r: TreeSpec(depth=2, width=3, nodes=6) for i, r in enumerate(running) if i % 3 == 0}
    return StepPlan(draft_len={r: 2 for i, r in enumerate(running) if i % 3 == 1}, tree=trees)


def tree_marginals(pair, rule, spec: TreeSpec | None, seed: int, cut_rule=None) -> tuple[np.ndarray, np.ndarray]:
    target, draft = pair
    engine = make_engine(target, draft, seed=seed, max_batch_size=SAMPLES)
    engine.target_verifier.tree_verifier = rule
    sampling = SamplingParams(max_new_tokens=3, temperature=1.0, stop_on_eos=False)
    for _ in range(SAMPLES):
        engine.add_request(PROMPT, sampling)
    while engine.has_unfinished():
        running = [v.request_id for v in engine.requests() if v.status == "running"]
        plan = StepPlan(tree=spec) if spec is not None else mixed_plan(running)
        drafts = engine.draft_step(replace(plan, prefill_budget=SAMPLES * len(PROMPT)))
        engine.verify(cut_rule(drafts) if cut_rule is not None else None)
    outputs = np.array([r.output_ids for r in engine.pop_finished()])
    assert outputs.shape == (SAMPLES, 3)
    return np.bincount(outputs[:, 1], minlength=VOCAB), np.bincount(outputs[:, 2], minlength=VOCAB)


def confidence_cut(drafts) -> torch.Tensor:
    """Verify the leading nodes while the draft's own probability of the node stays above 0.3
    (a cut that looks at the drafted tokens, as confidence-driven controllers do)."""
    if drafts.tokens.shape[1] == 0:
        return drafts.draft_len
    own = drafts.probs.gather(-1, drafts.tokens.clamp(min=0)[..., None])[..., 0]
    low = (own < 0.3) | (drafts.tokens < 0)
    return torch.where(low.any(1), low.float().argmax(1), drafts.draft_len)


@pytest.mark.parametrize("cut", [None, confidence_cut])
def test_sampled_trees_follow_target_distribution(cut):
    pair = _pair_models()
    p2, p3 = exact_marginals(pair[0], 1.0, 1.0)
    c2, c3 = tree_marginals(pair, verify_trees, TreeSpec(depth=2, width=3, nodes=6), seed=0, cut_rule=cut)
    assert chi_square_p(c2, p2) > 1e-3
    assert chi_square_p(c3, p3) > 1e-3


def test_sampled_mixed_trees_chains_and_plain_rows_follow_target_distribution():
    pair = _pair_models()
    p2, p3 = exact_marginals(pair[0], 1.0, 1.0)
    c2, c3 = tree_marginals(pair, verify_trees, None, seed=2)
    assert chi_square_p(c2, p2) > 1e-3
    assert chi_square_p(c3, p3) > 1e-3


def test_wrong_tree_rule_fails_the_same_bound():
    pair = _pair_models()
    p2, p3 = exact_marginals(pair[0], 1.0, 1.0)
    c2, c3 = tree_marginals(pair, always_first_child, TreeSpec(depth=2, width=3, nodes=6), seed=0)
    assert min(chi_square_p(c2, p2), chi_square_p(c3, p3)) < 1e-6


def _pair_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    from adactl.runtime.models import tiny_llama

    target = tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=3, init_std=0.1)
    draft = tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=1, seed=4, init_std=0.1)
    return target, draft


def test_replay_engine_refuses_trees_without_tree_traces_clearly():
    from adactl.runtime.replay import ReplayEngine

    from .test_stream import LinearCost

    engine = ReplayEngine(LinearCost(), alpha=[0.6, 0.5], seed=0)
    engine.add_request(8, SamplingParams(max_new_tokens=4))
    with pytest.raises(RequestError, match="drafts trees from tree traces"):
        engine.draft_step(StepPlan(tree=TreeSpec()))
    engine.step(StepPlan(draft_len=2))  # still serves chains


def test_a_tree_step_is_priced_by_the_draft_work_it_does():
    """A chain of k feeds k tokens in k forwards; a tree one forward per level, feeding the last
    token and then the nodes expanded at each level but the last (not one forward per node)."""
    from adactl.runtime.shapes import StepShape, draft_work

    assert draft_work([3, 2, 0]) == ([3, 2, 0], 3)
    parents = torch.tensor([[-1, 0, -1, 1, 0, 2, 3, 1], [-1, -1, 0, 1, -1, -1, -1, -1], [-1] * 8])
    assert draft_work([8, 4, 0], parents) == ([7, 3, 0], 4)  # depth 4 width 2: 1 + 2 + 2 + 2; a depth-3 chain-ish row
    chain = torch.tensor([[-1, 0, 1, -1]])
    assert draft_work([3], chain) == draft_work([3])  # a one-wide tree costs what its chain does
    shape = StepShape.of_lengths([8, 4, 0], *draft_work([8, 4, 0], parents)[:1], forwards=4)
    assert shape.max_draft == 4 and shape.draft_tokens == 10 and shape.verify_tokens == 15
