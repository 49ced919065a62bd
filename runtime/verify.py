"""Sampling and lossless verification of draft chains, as pure functions of tensors.

Definitions (DESIGN.md section 4):
- **Lossless verification.** Greedy = accept while the target argmax equals the draft token.
  Sampling = accept draft token x with prob `min(1, p(x)/q(x))`; on the first rejection
  resample from `norm(max(0, p - q))`; if all are accepted, sample a bonus token from `p`.
- **Cuts stay lossless for sampled rows** when the decision to verify draft token j depends
  on the tokens before it and on j's own confidence, not on later tokens. That is why a
  verified prefix shorter than the draft ends with one more test: the target's distribution
  after the last verified token is computed anyway, so the first *unverified* draft token is
  tested against it (accept with `min(1, p/q)`, else resample the residual) instead of a
  fresh draw from `p`. A cut after token j then only decides whether token j + 1 is tested,
  which may look at token j, as confidence thresholds do; with a fresh draw there, the cut
  would skew the output toward what the cut rule favours (tests/test_engine_sampling.py
  shows it). A choice made for the whole batch at once (Speculative Verification's global
  search, a tree budget) also looks, faintly, at a row's later tokens; its effect is below
  what the chi-square tests detect at 2,000 samples.
- **Trees** (`verify_trees`): siblings are drawn from the same `q` without replacement, in
  order (greedy rows: the most likely first). At a node, its children are tested in that
  order, each against the residual the rejected ones left (`p <- norm(max(0, p - q))` and
  `q <- q` without the rejected token, renormalised: Sequoia's rule). An accepted verified
  child is descended into; an accepted unverified child ends the step as its next token;
  when all fail, the next token comes from the residual. A chain is the one-child case, and
  the rule is then exactly the chain rule.
- `p` and `q` are the *processed* distributions (temperature, then top-p) of the target and
  the draft, so outputs follow exactly the distribution that plain sampling would use.
- **accepted**: draft tokens that passed; **next token**: the recovered token after the
  first rejection, or the bonus token when every verified token passed. A verify step emits
  `accepted + 1` tokens.
- Randomness comes in as explicit uniforms in [0, 1), one per decision (as vLLM's rejection
  sampler takes them), so these functions are deterministic. `counter_uniforms` makes them
  on the device from each row's seed and draw counter (a counter-based hash, as Philox is),
  so a seeded request draws the same numbers whatever else is in the batch, in one kernel.
- **Where things run.** Every rule runs on the device of the logits, batched over rows (trees
  too): nothing here copies a distribution to the host. The per-row parameters (temperature,
  top-p) may stay on the CPU, where they are read to choose rows without a device sync.

Nothing here knows about caches, requests or models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .types import node_depth


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying a batch of draft chains."""

    accepted: torch.Tensor  # [B] long: draft tokens accepted, 0 <= accepted <= verify_len
    next_token: torch.Tensor  # [B] long: recovered (after a rejection) or bonus token
    path: torch.Tensor | None = None  # [B, K] bool, trees only: the accepted nodes (a root path)


class Verifier(Protocol):
    """Anything that turns target/draft distributions into accepted lengths (swappable for tests)."""

    def __call__(
        self,
        target_logits: torch.Tensor,
        draft_probs: torch.Tensor,
        draft_tokens: torch.Tensor,
        verify_len: torch.Tensor,
        temperature: torch.Tensor,
        top_p: torch.Tensor,
        uniforms: torch.Tensor,
    ) -> VerifyResult: ...


def process_logits(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities after temperature and top-p, per row.

    logits: [B, ..., V]; temperature, top_p: [B]. Rows with temperature 0 (greedy) are
    given temperature 1, so their probabilities still say how confident the model is.
    Returns float32 probabilities of the same shape as `logits`.
    """
    shape = (-1,) + (1,) * (logits.dim() - 1)
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).view(shape)
    probs = torch.softmax(logits.float() / temp.to(logits.device, torch.float32), dim=-1)
    needs_top_p = top_p < 1.0
    if bool(needs_top_p.any()):
        rows = needs_top_p.nonzero().squeeze(1)  # on top_p's device (the CPU)
        on_device = rows.to(probs.device)
        probs[on_device] = _top_p(probs[on_device], top_p[rows])
    return probs


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; renormalise."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
    limit = top_p.view((-1,) + (1,) * (probs.dim() - 1)).to(probs.device, probs.dtype)
    sorted_probs = sorted_probs.masked_fill(mass_before >= limit, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: argmax for greedy rows, a draw from `probs` otherwise.

    probs: [B, V] (need not be normalised); greedy: [B] bool; uniforms: [B] in [0, 1).
    The draw is by inverse CDF, so it never returns a token of probability 0. Returns [B] long.
    """
    tokens = probs.argmax(-1)
    if not bool(greedy.all()):  # (greedy on the CPU: no device sync)
        cdf = probs.float().cumsum(-1)  # [B, V]
        target = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
        tokens = torch.where(greedy.to(tokens.device), tokens, drawn)
    return tokens


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32) (a products'
    overflow wraps, and only its low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def counter_uniforms(seeds: torch.Tensor, offsets: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] float32 uniforms in [0, 1): row i's draws number offsets[i] .. offsets[i] +
    width - 1 of the stream of seed seeds[i], computed on the seeds' device in one pass.

    The same (seed, draw number) gives the same uniform on any device and in any batch, so
    a request that counts its draws samples the same tokens alone or among others.
    seeds, offsets: [B] int64, seeds >= 0."""
    seeds, offsets = seeds.long(), offsets.long()
    key = _mix32((seeds & _MASK32) ^ _mix32(((seeds >> 32) + 0x9E3779B9) & _MASK32))
    counter = (offsets[:, None] + torch.arange(width, device=seeds.device)[None, :]) & _MASK32
    x = _mix32(_mix32((counter + key[:, None]) & _MASK32) ^ key[:, None])
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def verify_chains(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    verify_len: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> VerifyResult:
    """Lossless verification of one draft chain per row (greedy and sampled rows mixed).

    target_logits: [B, T, V] target logits at the row's last token and each verified draft
                   token (T >= max(verify_len) + 1).
    draft_probs:   [B, K, V] processed draft distribution each draft token was drawn from.
    draft_tokens:  [B, K] long (K >= max(verify_len); entries past a row's draft are ignored).
    verify_len:    [B] long, how many leading draft tokens of each row are verified.
    temperature, top_p: [B] sampling parameters (temperature 0 = greedy).
    uniforms:      [B, T] in [0, 1): column i decides draft token i + 1 (for i < verify_len,
                   and i = verify_len: the test of the first unverified draft token); a
                   resample after a rejection reuses the rejecting uniform, rescaled
                   (`rescaled`); after a fully accepted draft, column verify_len draws the
                   bonus token. A row uses exactly verify_len + 1.
    """
    b, t, _ = target_logits.shape
    dev = target_logits.device
    sampled_host = (temperature > 0).nonzero().squeeze(1)  # on temperature's device (the CPU)
    if t == 1 and len(sampled_host) == 0:  # greedy rows, nothing verified: the target's argmax
        none = torch.zeros(b, dtype=torch.long, device=dev)
        return VerifyResult(accepted=none, next_token=target_logits[:, 0].argmax(-1))
    rows = torch.arange(b, device=dev)
    n_check = t - 1
    verify_len = verify_len.to(dev)
    in_range = torch.arange(n_check, device=dev)[None, :] < verify_len[:, None]  # [B, T-1]
    tokens = draft_tokens[:, :n_check].clamp(min=0)  # [B, T-1]

    # Greedy rows: accept while the target argmax equals the draft token.
    target_argmax = target_logits.argmax(-1)  # [B, T]
    ok = (target_argmax[:, :n_check] == tokens) & in_range

    sampled_rows = sampled_host.to(dev)
    p = None
    if len(sampled_host) > 0:
        # Sampled rows: accept x with prob min(1, p(x)/q(x)), i.e. u * q(x) < p(x).
        p = process_logits(target_logits[sampled_rows], temperature[sampled_host], top_p[sampled_host])
        q = draft_probs[sampled_rows, :n_check].float()
        tok = tokens[sampled_rows, :, None]
        p_tok = p[:, :n_check].gather(-1, tok).squeeze(-1)
        q_tok = q.gather(-1, tok).squeeze(-1)
        u = uniforms[sampled_rows, :n_check].to(q_tok.device, q_tok.dtype)
        ok[sampled_rows] = (u * q_tok < p_tok) & in_range[sampled_rows]

    accepted = ok.long().cumprod(1).sum(1)  # [B] leading run of accepted tokens
    next_token = target_argmax[rows, accepted]
    if p is not None:
        s_idx = torch.arange(len(sampled_host), device=dev)
        acc = accepted[sampled_rows]
        p_at = p[s_idx, acc]  # [S, V] the target's distribution where the next token goes
        k = draft_tokens.shape[1]
        # the draft token at `acc`: rejected (acc < verify_len), the first unverified one (tested
        # now), or none (the whole draft verified and passed: a bonus token from p)
        at = acc.clamp(max=max(k - 1, 0))
        x = draft_tokens[sampled_rows, at] if k else torch.full_like(acc, -1)
        has_token = (acc < k) & (x >= 0)
        x = x.clamp(min=0)
        q_at = draft_probs[sampled_rows, at].float() if k else torch.zeros_like(p_at)
        u = uniforms[sampled_rows].gather(1, acc[:, None]).squeeze(1).to(p_at.device, p_at.dtype)
        ratio = torch.clamp(p_at[s_idx, x] / q_at[s_idx, x].clamp(min=1e-30), max=1.0)
        passes = has_token & (u < ratio)  # (inside the prefix this already failed: u * q >= p)
        rejected = has_token & ~passes
        next_token[sampled_rows] = torch.where(passes, x, _resample(p_at, q_at, rejected, u, ratio))
    return VerifyResult(accepted=accepted, next_token=next_token)


def _resample(p: torch.Tensor, q: torch.Tensor, rejected: torch.Tensor, u: torch.Tensor, ratio: torch.Tensor):
    """[S] the next token: from norm(max(0, p - q)) after a rejection (with the rejecting uniform
    rescaled), else from p with u."""
    residual = (p - q).clamp(min=0.0)
    mass = residual.sum(-1, keepdim=True)
    use_p = ~rejected[:, None] | (mass <= 0)  # p == q exactly: rejection had prob 0
    dist = torch.where(use_p, p, residual / mass.clamp(min=1e-30))
    u = torch.where(rejected, rescaled(u, ratio), u)
    return sample(dist, torch.zeros(len(u), dtype=torch.bool), u)


def rescaled(u: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """A rejecting uniform made uniform again: a draft token passes when u < ratio = min(1, p/q),
    so after a rejection u is uniform on [ratio, 1), and (u - ratio) / (1 - ratio) is uniform on
    [0, 1) and independent of the decision: one uniform serves a test and its resample."""
    return ((u - ratio) / (1 - ratio).clamp(min=1e-12)).clamp(0.0, 1.0 - 1e-7)


def tree_children(parents: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tree's structure as a table: children [B, K + 1, W] (slot 0: the row's last token,
    slot j + 1: node j; each node's children in node order, -1 padded) and the number of
    levels. parents, valid: [B, K] (parents before children, siblings in draw order)."""
    b, k = parents.shape
    slot = torch.where(valid, parents + 1, -1)  # the parent's slot, -1 for no node
    earlier = torch.ones(k, k, dtype=torch.bool, device=parents.device).tril(-1)  # [j, i]: i < j
    rank = ((slot[:, :, None] == slot[:, None, :]) & valid[:, None, :] & earlier).sum(-1)  # [B, K]
    width = int(rank[valid].max()) + 1 if bool(valid.any()) else 1
    children = torch.full((b, k + 1, width), -1, dtype=torch.long, device=parents.device)
    b_idx, j_idx = valid.nonzero(as_tuple=True)
    children[b_idx, slot[b_idx, j_idx], rank[b_idx, j_idx]] = j_idx
    depth = node_depth(parents.cpu()).to(parents.device)
    levels = int(depth[valid].max()) + 1 if bool(valid.any()) else 0
    return children, levels


def sibling_ratios(p: torch.Tensor, q: torch.Tensor, tokens: list[int]) -> list[float]:
    """The chance each of a node's children (tokens, in draw order) is accepted given that the
    node was and the children before it were not: `verify_trees`' rule with its residual
    updates, for one node (p, q [V]: the processed target and draft distributions there). For
    recording what a tree meets (adactl.runtime.traces); a greedy row's is argmax agreement."""
    p, q = p.double(), q.double()
    out = []
    for x in tokens:
        out.append(float(torch.clamp(p[x] / q[x].clamp(min=1e-30), max=1.0)))
        residual = (p - q).clamp(min=0.0)
        mass = residual.sum()
        p = residual / mass if mass > 0 else p
        q = q.clone()
        q[x] = 0.0
        total = q.sum()
        q = q / total if total > 0 else q
    return out


def verify_trees(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    verify_len: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> VerifyResult:
    """Lossless verification of one draft token tree per row (module docstring, "Trees"),
    batched: every row walks its tree at once, one level per iteration, testing a node's
    children rank by rank.

    target_logits: [B, T, V]: column 0 at the row's last token, column j + 1 at node j
                   (T >= max(verify_len) + 1).
    draft_probs:   [B, K, V] the processed draft distribution node j was drawn from (its parent's).
    draft_tokens:  [B, K] long, -1 past a row's nodes.
    parents:       [B, K] long parent node of each node, -1 = a child of the last token. Nodes
                   come parents first and siblings in draw order, so that every prefix of
                   the node order is a tree (the engine's drafts are). Best on the CPU (the
                   structure is read there).
    verify_len:    [B] long, nodes verified (a prefix of the node order).
    uniforms:      [B, K + 1]: column j decides node j; a resample reuses the rejecting
                   uniform, rescaled; column K (K = the row's nodes) draws a bonus token.
    Returns accepted [B] (path length), next_token [B] and path [B, K] (accepted nodes),
    on the logits' device.
    """
    dev = target_logits.device
    b, k = draft_tokens.shape
    if k == 0:  # no row drafted: one empty node column, so that the walk has children to look at
        result = verify_trees(target_logits, draft_probs.new_zeros(b, 1, target_logits.shape[-1]),
                              draft_tokens.new_full((b, 1), -1), parents.new_full((b, 1), -1), verify_len,
                              temperature, top_p, uniforms)  # fmt: skip
        assert result.path is not None
        return VerifyResult(result.accepted, result.next_token, result.path[:, :0])
    valid = (draft_tokens >= 0).to(parents.device)
    children, levels = tree_children(parents, valid)
    children = children.to(dev)
    n_nodes = valid.sum(1).to(dev)
    v = verify_len.to(dev)
    rows = torch.arange(b, device=dev)
    greedy_host = temperature <= 0
    greedy = greedy_host.to(dev)
    any_sampled = not bool(greedy_host.all())
    never_greedy = torch.zeros(b, dtype=torch.bool)
    node = torch.full((b,), -1, dtype=torch.long, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    next_token = torch.zeros(b, dtype=torch.long, device=dev)
    path = torch.zeros(b, k, dtype=torch.bool, device=dev)
    for _ in range(levels + 1):  # each iteration descends one level or ends the walk
        kids = children[rows, node + 1]  # [B, W]: the children of each row's path end
        has = kids >= 0
        kid = kids.clamp(min=0)
        logits = target_logits[rows, node + 1]  # [B, V] the target after the path
        # greedy rows: descend into the child that is the target's argmax, if verified
        best = logits.argmax(-1)
        match = has & (draft_tokens.gather(1, kid) == best[:, None])
        hit = torch.where(match.any(1), kid.gather(1, match.long().argmax(1, keepdim=True)).squeeze(1), -1)
        new_node, nxt = hit, best
        if any_sampled:  # sampled rows: Sequoia's rule over the children, in draw order
            p = process_logits(logits, temperature, top_p).double()
            q = draft_probs[rows, kid[:, 0]].double()  # siblings share their parent's distribution
            chosen = torch.full((b,), -1, dtype=torch.long, device=dev)
            last_u = torch.zeros(b, dtype=torch.float64, device=dev)
            last_ratio = torch.zeros_like(last_u)
            rejected_any = torch.zeros(b, dtype=torch.bool, device=dev)
            for s in range(kids.shape[1]):
                live = has[:, s] & (chosen < 0)
                x = draft_tokens[rows, kid[:, s]].clamp(min=0)
                ratio = torch.clamp(p[rows, x] / q[rows, x].clamp(min=1e-30), max=1.0)
                u = uniforms[rows, kid[:, s]].double()
                passes = live & (u < ratio)
                chosen = torch.where(passes, kids[:, s], chosen)
                rej = (live & ~passes)[:, None]
                residual = (p - q).clamp(min=0.0)
                mass = residual.sum(-1, keepdim=True)
                p = torch.where(rej & (mass > 0), residual / mass.clamp(min=1e-300), p)
                q = torch.where(rej, q.scatter(1, x[:, None], 0.0), q)
                total = q.sum(-1, keepdim=True)
                q = torch.where(rej & (total > 0), q / total.clamp(min=1e-300), q)
                last_u, last_ratio = torch.where(rej[:, 0], u, last_u), torch.where(rej[:, 0], ratio, last_ratio)
                rejected_any |= rej[:, 0]
            bonus_u = uniforms[rows, n_nodes.clamp(max=uniforms.shape[1] - 1)]
            u_draw = torch.where(rejected_any, rescaled(last_u.float(), last_ratio.float()), bonus_u)
            drawn = sample(p.float(), never_greedy, u_draw)
            sampled_next = torch.where(chosen >= 0, draft_tokens[rows, chosen.clamp(min=0)], drawn)
            new_node = torch.where(greedy, hit, chosen)
            nxt = torch.where(greedy, best, sampled_next)
        descend = active & (new_node >= 0) & (new_node < v)
        next_token = torch.where(active & ~descend, nxt, next_token)
        path |= torch.nn.functional.one_hot(new_node.clamp(min=0), k).bool() & descend[:, None]
        node = torch.where(descend, new_node, node)
        active = descend
    return VerifyResult(accepted=path.sum(1), next_token=next_token, path=path)
