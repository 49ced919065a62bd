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
  sampler takes them), so these functions are deterministic and each row's draws can come
  from its own seeded generator.

Nothing here knows about caches, requests or models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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
    if not bool(greedy.all()):
        cdf = probs.float().cumsum(-1)  # [B, V]
        target = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
        tokens = torch.where(greedy, tokens, drawn)
    return tokens


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
    rows = torch.arange(b, device=target_logits.device)
    greedy = temperature <= 0
    n_check = t - 1
    in_range = torch.arange(n_check, device=rows.device)[None, :] < verify_len[:, None]  # [B, T-1]
    tokens = draft_tokens[:, :n_check].clamp(min=0)  # [B, T-1]

    # Greedy rows: accept while the target argmax equals the draft token.
    target_argmax = target_logits.argmax(-1)  # [B, T]
    ok = (target_argmax[:, :n_check] == tokens) & in_range

    sampled_rows = (~greedy).nonzero().squeeze(1)
    p = None
    if len(sampled_rows) > 0:
        # Sampled rows: accept x with prob min(1, p(x)/q(x)), i.e. u * q(x) < p(x).
        p = process_logits(target_logits[sampled_rows], temperature[sampled_rows], top_p[sampled_rows])
        q = draft_probs[sampled_rows, :n_check].float()
        tok = tokens[sampled_rows, :, None]
        p_tok = p[:, :n_check].gather(-1, tok).squeeze(-1)
        q_tok = q.gather(-1, tok).squeeze(-1)
        u = uniforms[sampled_rows, :n_check].to(q_tok.device, q_tok.dtype)
        ok[sampled_rows] = (u * q_tok < p_tok) & in_range[sampled_rows]

    accepted = ok.long().cumprod(1).sum(1)  # [B] leading run of accepted tokens
    next_token = target_argmax[rows, accepted]
    if p is not None:
        s_idx = torch.arange(len(sampled_rows), device=rows.device)
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
    return sample(dist, torch.zeros_like(rejected), u)


def rescaled(u: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """A rejecting uniform made uniform again: a draft token passes when u < ratio = min(1, p/q),
    so after a rejection u is uniform on [ratio, 1), and (u - ratio) / (1 - ratio) is uniform on
    [0, 1) and independent of the decision: one uniform serves a test and its resample."""
    return ((u - ratio) / (1 - ratio).clamp(min=1e-12)).clamp(0.0, 1.0 - 1e-7)


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
    """Lossless verification of one draft token tree per row (module docstring, "Trees").

    target_logits: [B, T, V]: column 0 at the row's last token, column j + 1 at node j
                   (T >= max(verify_len) + 1).
    draft_probs:   [B, K, V] the processed draft distribution node j was drawn from (its parent's).
    draft_tokens:  [B, K] long, -1 past a row's nodes.
    parents:       [B, K] long parent node of each node, -1 = a child of the last token. Nodes
                   come parents first and siblings in draw order, so that every prefix of
                   the node order is a tree (the engine's drafts are).
    verify_len:    [B] long, nodes verified (a prefix of the node order).
    uniforms:      [B, K + 1]: column j decides node j; a resample reuses the rejecting
                   uniform, rescaled; column K (K = the row's nodes) draws a bonus token.
    Returns accepted [B] (path length), next_token [B] and path [B, K] (accepted nodes).
    """
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
