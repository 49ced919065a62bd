"""The pure verification functions, on hand-made distributions."""

from __future__ import annotations

import torch

from adactl.runtime import process_logits, verify_chains


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
