"""Sampling and lossless verification of draft chains, as pure functions of tensors.

Definitions (DESIGN.md section 4):
- **Lossless verification.** Greedy = accept while the target argmax equals the draft token.
  Sampling = accept draft token x with prob `min(1, p(x)/q(x))`; on the first rejection
  resample from `norm(max(0, p - q))`; if all are accepted, sample a bonus token from `p`.
  Verifying a shorter prefix never changes this rule, so prefix selection is free of
  quality loss.
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
    uniforms:      [B, T] in [0, 1): column i < verify_len decides draft token i+1; column
                   verify_len (read by no acceptance decision, so still uniform whatever
                   was decided) draws the next token. A row uses exactly verify_len + 1.
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
        acc = accepted[sampled_rows]
        p_at = p[torch.arange(len(sampled_rows), device=acc.device), acc]  # [S, V]
        all_passed = acc == verify_len[sampled_rows]
        # First rejection: resample from norm(max(0, p - q)); all passed: bonus token from p.
        if draft_probs.shape[1] > 0:
            q_at = draft_probs[sampled_rows, acc.clamp(max=draft_probs.shape[1] - 1)].float()
            residual = (p_at - q_at).clamp(min=0.0)
        else:
            residual = p_at
        residual_mass = residual.sum(-1, keepdim=True)
        use_p = all_passed[:, None] | (residual_mass <= 0)  # p == q exactly: rejection had prob 0
        dist = torch.where(use_p, p_at, residual / residual_mass.clamp(min=1e-30))
        u_next = uniforms[sampled_rows].gather(1, verify_len[sampled_rows, None]).squeeze(1)
        next_token[sampled_rows] = sample(dist, torch.zeros_like(acc, dtype=torch.bool), u_next)
    return VerifyResult(accepted=accepted, next_token=next_token)
