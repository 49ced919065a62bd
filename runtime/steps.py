"""What the two halves of a step hand each other: the proposer's `Drafts` (draft.py) to the
target's verifier (target.py), and the verifier's `Verdict` back to the engine and the
proposer. Plain data, below both, so a step reads top-down: engine -> draft, target -> steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .types import DraftSummary, summarize_drafts


@dataclass
class Drafts:
    """One step's drafts for all decode rows (on the device, but `parents`)."""

    tokens: torch.Tensor  # [rows, K] long target ids, -1 where nothing was drafted
    probs: torch.Tensor  # [rows, K, V] float32 distribution each token was drawn from (0 there)
    companion_probs: torch.Tensor | None = None  # [rows, K, V] the companion's, at the same positions
    parents: torch.Tensor | None = None  # [rows, K] long, trees only (on the CPU)

    def to_host(
        self, draft_len: torch.Tensor, support: torch.Tensor | None
    ) -> tuple[torch.Tensor, DraftSummary | None]:
        """The tokens on the CPU and, off the CPU, the summary controllers read, in one
        transfer (on the CPU the summary is left to whoever reads it)."""
        if self.tokens.device.type == "cpu":
            return self.tokens, None
        s = summarize_drafts(self.tokens, draft_len, self.probs, self.companion_probs, support)
        parts = [s.token_prob, s.entropy, s.margin]
        if s.companion_token_prob is not None and s.overlap is not None:
            parts += [s.companion_token_prob, s.overlap]
        host = torch.stack([self.tokens.float(), *parts]).cpu()  # (token ids < 2^24 are exact)
        more = [host[4], host[5]] if len(parts) > 3 else [None, None]
        return host[0].long(), DraftSummary(host[1], host[2], host[3], *more)


@dataclass
class Verdict:
    """What the host learns from one verification (all on the CPU but `features`)."""

    accepted: torch.Tensor  # [rows] long: draft tokens accepted (a tree: nodes on the path)
    next_token: torch.Tensor  # [rows] long: the correction or bonus token
    path: torch.Tensor | None  # [rows, K] bool, trees only: the accepted nodes
    features: torch.Tensor | None  # [rows, T, H] the features a feature draft reads (`target_features`)

    @functools.cached_property
    def nodes(self) -> list[list[int]]:
        """Each row's accepted draft nodes, in order (a chain's first `accepted`; a tree's
        path); computed once, read by the engine's emit and the proposer's settle."""
        if self.path is not None:
            return [row.nonzero().squeeze(1).tolist() for row in self.path]
        return [list(range(a)) for a in self.accepted.tolist()]
