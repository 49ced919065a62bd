"""The pure verification functions, on hand-made distributions."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from adactl.runtime import process_logits, verify_chains, verify_trees
from adactl.runtime.traces import tree_accepted
from adactl.runtime.verify import VerifyResult, counter_uniforms, rescaled, sample, sibling_ratios


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = process_logits(probs.log()[None], torch.tensor([1.0]), torch.tensor([0.8]))[0]
    assert torch.allclose(out, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    out = process_logits(probs.log()[None], torch.tensor([1.0]), torch.tensor([0.81]))[0]
    assert torch.allclose(out, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_temperature_and_greedy_rows():
    logits = torch.tensor([[[2.0, 1.0, 0.0]], [[2.0, 1.0, 0.0]]])
    out = process_logits(logits, torch.tensor([0.0, 0.5]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(out[0, 0], torch.softmax(logits[0, 0], -1))  # greedy rows: temperature 1
    assert torch.allclose(out[1, 0], torch.softmax(logits[1, 0] / 0.5, -1))


def test_greedy_acceptance_counts_leading_matches():
    v = 5
    # target argmax per position: 1, 2, 3, 4
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]), v).float() * 10
    drafts = torch.tensor([[1, 2, 0], [1, 2, 3], [0, 2, 3]])
    verify_len = torch.tensor([3, 3, 3])
    greedy, no_top_p, unused = torch.zeros(3), torch.ones(3), torch.zeros(3, 4)
    res = verify_chains(logits, torch.zeros(3, 3, v), drafts, verify_len, greedy, no_top_p, unused)
    assert res.accepted.tolist() == [2, 3, 0]
    assert res.next_token.tolist() == [3, 4, 1]  # correction, bonus, correction
    short = torch.tensor([1, 0, 2])
    cut = verify_chains(logits, torch.zeros(3, 3, v), drafts, short, torch.zeros(3), torch.ones(3), torch.zeros(3, 4))
    assert cut.accepted.tolist() == [1, 0, 0]
    assert cut.next_token.tolist() == [2, 1, 1]


def test_rejection_never_resamples_the_rejected_token():
    """When q puts more mass on x than p, a rejection resamples from max(0, p - q), where x has 0."""
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.0, 1.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    n = 4000
    uniforms = torch.rand(n, 2, generator=gen)
    logits = p.clamp(min=1e-12).log().expand(n, 2, 3).clone()
    res = verify_chains(
        logits,
        q.expand(n, 1, 3).clone(),
        torch.ones(n, 1, dtype=torch.long),
        torch.ones(n, dtype=torch.long),
        torch.ones(n),
        torch.ones(n),
        uniforms,
    )
    accepted = res.accepted == 1
    assert abs(accepted.float().mean().item() - 0.5) < 0.05  # min(1, p/q) = 0.5
    assert (res.next_token[~accepted] == 0).all()  # the residual is all on token 0


# ------------------------------------------------------------------ trees, batched
def reference_verify_trees(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    verify_len: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> VerifyResult:
    """The rule node by node in plain Python (the spec the batched `verify_trees` must match)."""
    b, k = draft_tokens.shape
    accepted = torch.zeros(b, dtype=torch.long)
    next_token = torch.zeros(b, dtype=torch.long)
    path = torch.zeros(b, k, dtype=torch.bool)
    n_nodes = (draft_tokens >= 0).sum(1)
    for i in range(b):
        v, n = int(verify_len[i]), int(n_nodes[i])
        greedy = bool(temperature[i] <= 0)
        kids: dict[int, list[int]] = {}
        for j in range(n):
            kids.setdefault(int(parents[i, j]), []).append(j)
        logits = target_logits[i, : v + 1]
        probs = None if greedy else process_logits(logits[None], temperature[i : i + 1], top_p[i : i + 1])[0]
        node, column = -1, 0  # the path's end, and its column in target_logits
        while True:
            children = kids.get(node, [])
            if greedy:
                best = int(logits[column].argmax())
                hit = next((c for c in children if int(draft_tokens[i, c]) == best), None)
                if hit is not None and hit < v:
                    path[i, hit], node, column = True, hit, hit + 1
                    continue
                next_token[i] = best
                break
            assert probs is not None
            p, q = probs[column].double(), None
            chosen, last_u, last_ratio = None, None, None
            for c in children:
                if q is None:
                    q = draft_probs[i, c].double().clone()
                x = int(draft_tokens[i, c])
                ratio = min(1.0, float(p[x]) / max(float(q[x]), 1e-30))
                u = float(uniforms[i, c])
                if u < ratio:
                    chosen = c
                    break
                residual = (p - q).clamp(min=0.0)
                if float(residual.sum()) > 0:
                    p = residual / residual.sum()
                q[x] = 0.0
                q = q / q.sum() if float(q.sum()) > 0 else q
                last_u, last_ratio = u, ratio
            if chosen is not None and chosen < v:
                path[i, chosen], node, column = True, chosen, chosen + 1
                continue
            if chosen is not None:  # an unverified child passed: it is the next token
                next_token[i] = int(draft_tokens[i, chosen])
                break
            if last_u is not None and last_ratio is not None:
                u_draw = float(rescaled(torch.tensor(last_u), torch.tensor(last_ratio)))
            else:
                u_draw = float(uniforms[i, n])
            next_token[i] = int(sample(p[None].float(), torch.zeros(1, dtype=torch.bool), torch.tensor([u_draw]))[0])
            break
        accepted[i] = int(path[i].sum())
    return VerifyResult(accepted=accepted, next_token=next_token, path=path)


def random_trees(b: int, k: int, v: int, seed: int):
    """Random token trees in the engine's order (parents first, siblings in draw order, drawn
    without replacement from their parent's distribution), with random cuts and uniforms."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.full((b, k), -1, dtype=torch.long)
    parents = torch.full((b, k), -1, dtype=torch.long)
    probs = torch.zeros(b, k, v)
    for i in range(b):
        n = int(torch.randint(0, k + 1, (1,), generator=gen))
        dists = {p: torch.softmax(2 * torch.randn(v, generator=gen), -1) for p in range(-1, n)}
        used: dict[int, set[int]] = {}
        for j in range(n):
            p = int(torch.randint(-1, j, (1,), generator=gen)) if j else -1
            left = dists[p].clone()
            left[list(used.get(p, set()))] = 0.0
            if float(left.sum()) <= 0:
                break
            t = int(torch.multinomial(left, 1, generator=gen))
            used.setdefault(p, set()).add(t)
            tokens[i, j], parents[i, j], probs[i, j] = t, p, dists[p]
        n = int((tokens[i] >= 0).sum())
        parents[i, n:] = -1
    logits = 2 * torch.randn(b, k + 1, v, generator=gen)
    cut = torch.minimum(torch.randint(0, k + 1, (b,), generator=gen), (tokens >= 0).sum(1))
    temp = torch.where(torch.rand(b, generator=gen) < 0.3, 0.0, torch.rand(b, generator=gen) + 0.5)
    top_p = torch.where(torch.rand(b, generator=gen) < 0.3, 0.8, 1.0)
    u = torch.rand(b, k + 1, generator=gen)
    return logits, probs, tokens, parents, cut, temp, top_p, u


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_tree_rule_equals_the_rule_node_by_node(seed):
    """The batched rule decides exactly what the plain per-node walk decides: greedy and
    sampled rows, top-p, cuts, rejections and bonus tokens."""
    args = random_trees(b=96, k=7, v=12, seed=seed)
    logits, probs, tokens, parents, cut, temp, top_p, u = args
    got = verify_trees(*args)
    want = reference_verify_trees(*args)
    assert torch.equal(got.path, want.path)
    assert torch.equal(got.accepted, want.accepted)
    assert torch.equal(got.next_token, want.next_token)
    assert int(want.accepted.sum()) > 0 and bool((want.accepted < cut).any())  # the test sees both


def test_counter_uniforms_are_uniform_and_independent_of_the_batch():
    seeds = torch.tensor([0, 1, 2**40 + 7, 123456789])
    offsets = torch.tensor([0, 5, 0, 2**31])
    u = counter_uniforms(seeds, offsets, 4096)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    for row in u:  # each stream looks uniform: ten equal bins
        counts = torch.histc(row, bins=10, min=0.0, max=1.0).numpy()
        assert chisquare(counts).pvalue > 1e-4
    # the same draw numbers of one seed give the same uniforms, alone or in another batch
    alone = counter_uniforms(seeds[2:3], offsets[2:3] + 10, 6)
    torch.testing.assert_close(alone[0], u[2, 10:16], rtol=0, atol=0)
    assert not torch.equal(u[0, :100], u[1, :100])
    # neighbouring seeds are not correlated
    assert abs(float(torch.corrcoef(counter_uniforms(torch.tensor([5, 6]), torch.zeros(2), 4096))[0, 1])) < 0.06


def test_recorded_sibling_ratios_replay_the_tree_rule_exactly():
    """What a tree trace records per node (`sibling_ratios` on the target at its parent; greedy:
    argmax agreement), walked with the same uniforms (`tree_accepted`), accepts exactly the path
    `verify_trees` accepts: the replay of a recorded tree is the engine's rule."""
    logits, probs, tokens, parents, cut, temp, top_p, u = args = random_trees(b=1000, k=7, v=12, seed=0)
    want = verify_trees(*args)
    p = process_logits(logits, temp, top_p)
    for i in range(len(tokens)):
        n = int((tokens[i] >= 0).sum())
        ratio = [0.0] * n
        for parent in sorted({int(x) for x in parents[i, :n]}):
            kids = [j for j in range(n) if int(parents[i, j]) == parent]
            if float(temp[i]) <= 0:
                best = int(logits[i, parent + 1].argmax())
                got = [float(int(tokens[i, j]) == best) for j in kids]
            else:
                got = sibling_ratios(p[i, parent + 1], probs[i, kids[0]], [int(tokens[i, j]) for j in kids])
            for j, r in zip(kids, got):
                ratio[j] = r
        path = tree_accepted(parents[i, :n].tolist(), ratio, u[i, :n].tolist(), int(cut[i]))
        assert path == want.path[i].nonzero().flatten().tolist(), i
    assert int(want.accepted.sum()) > 0
