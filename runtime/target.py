"""The target's half of a step: forwards over each row's last token and verified drafts, the
lossless rule on the logits' device (`adactl.runtime.verify`), the verdicts to the host in
one copy, then the target cache rolled back to what was accepted.

Rows come in draft-length order, so verify lengths mostly fall along the batch: where one
forward over the whole [rows, longest] rectangle would mostly compute padding, the rows
split into two ranges, each as wide as its own longest (`rows.verify_split`). A tree step
verifies each row's first `cut` nodes in one forward with a tree mask and keeps only the
accepted path in the cache.

Not here: which prefix to verify (the caller's cut), the draft cache (the proposer's), what
is emitted (the engine's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .kv import BatchKV
from .row_padding import padded_linears, row_padding
from .rows import Request, RowSampling, slot_parents
from .shapes import verify_split
from .steps import Drafts, Verdict
from .verify import Verifier, process_logits, verify_chains


def _rows_of(x: torch.Tensor, slots: bool = False, *, part: slice | None, width: int) -> torch.Tensor:
    """Rows `part` of a per-row tensor (and with `slots`, its first `width` slots); all of it
    where the forward covers every row (part None)."""
    if part is None:
        return x
    return x[part, :width] if slots else x[part]


class TargetVerifier:
    """Runs the target over the pending drafts of the first rows of its batch cache."""

    def __init__(
        self, model: Any, kv: Callable[[], BatchKV], device: torch.device,
        features: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None,
        verifier: Verifier, tree_verifier: Callable[..., Any],
    ) -> None:  # fmt: skip
        """features: a feature draft's `target_features` (None: no feature draft)."""
        self.model, self._kv, self.device, self.features = model, kv, device, features
        row_padding(model)  # measured now if this machine has no table for it: not inside a timed step
        self.verifier, self.tree_verifier = verifier, tree_verifier

    def _ids(self, rows: list[Request], drafts: Drafts, t: int) -> torch.Tensor:
        """[rows, t] on the device: each row's last token, then its first t - 1 draft tokens."""
        last = torch.tensor([[r.target_pending[-1]] for r in rows]).to(self.device)  # [rows, 1]
        if t == 1:
            return last
        return torch.cat([last, drafts.tokens[:, : t - 1].clamp(min=0)], dim=1)

    def verify(self, rows: list[Request], drafts: Drafts, draft_len: torch.Tensor, cut: torch.Tensor) -> Verdict:
        """Verify the first `cut[i]` draft tokens of each row (cut, draft_len: [rows], CPU)."""
        kv, d, n = self._kv(), drafts, len(rows)
        cuts = cut.tolist()
        t, k, trees = max(cuts) + 1, d.tokens.shape[1], d.parents is not None
        extra: dict[str, Any] = {"feature_fn": self.features} if self.features is not None else {}
        if not trees and self.verifier is verify_chains and min(cuts) == t - 1:
            if all(r.sampling.temperature <= 0 for r in rows):
                return self._greedy(kv, rows, d, t, extra)
        ids = self._ids(rows, d, t)
        # the verified slots (None: every row verifies t - 1 tokens, so every slot is real)
        valid = None if min(cuts) == t - 1 else torch.arange(t)[None, :] <= cut[:, None]
        tree_parents = slot_parents(d.parents, t) if d.parents is not None else None
        s = RowSampling(rows, self.device)
        if d.parents is not None:
            uniforms = s.uniforms([int(v) + 1 for v in draft_len], k + 1)
        else:
            uniforms = s.uniforms([c + 1 for c in cuts], t)
        verdict = torch.zeros(n, 2 + k, dtype=torch.long, device=self.device) if trees else None  # accepted, next, path
        decided: list[torch.Tensor] = []  # chains: [rows of a part, 2] accepted, next
        features: torch.Tensor | None = None
        parts = verify_split(cuts)
        whole = len(parts) == 1  # one forward over every row and slot: nothing to slice
        ends: list[int] = []
        for r0, r1 in parts:
            w, part = max(cuts[r0:r1]) + 1, slice(r0, r1)
            rows_of = functools.partial(_rows_of, part=None if whole else part, width=w)
            parents = rows_of(tree_parents, True) if tree_parents is not None else None
            with padded_linears(self.model, (r1 - r0) * w):
                out = kv.forward(self.model, rows_of(ids, True), rows_of(valid, True) if valid is not None else None,
                                 parents=parents, first_row=r0, **extra)  # fmt: skip
            assert kv.last_end is not None
            ends.append(kv.last_end)
            if self.features is not None:
                h = out.features
                if whole:  # (read by the proposer's settle before the next forward)
                    features = h
                else:
                    features = h.new_zeros(n, t, h.shape[-1]) if features is None else features
                    features[part, :w] = h
            args = (out.logits, rows_of(d.probs), rows_of(d.tokens))
            rest = (rows_of(cut), rows_of(s.temperature), rows_of(s.top_p))
            if verdict is not None:
                assert d.parents is not None
                result = self.tree_verifier(*args, rows_of(d.parents), *rest, rows_of(uniforms))
                verdict[part, 0], verdict[part, 1], verdict[part, 2:] = result.accepted, result.next_token, result.path
            else:
                result = self.verifier(*args, *rest, rows_of(uniforms, True))
                decided.append(torch.stack([result.accepted, result.next_token], 1))
        # the step's one copy back
        host = verdict.cpu() if verdict is not None else (decided[0] if whole else torch.cat(decided)).cpu()
        accepted, path = host[:, 0], host[:, 2:].bool() if trees else None
        for (r0, r1), end in zip(parts, ends):  # roll back: keep each row's accepted tokens
            w = max(cuts[r0:r1]) + 1
            if w == 1:  # only each row's last token, always kept: nothing to roll back
                continue
            if path is not None:
                keep = torch.cat([torch.ones(r1 - r0, 1, dtype=torch.bool), path[r0:r1, : w - 1]], 1)
            else:
                keep = torch.arange(w)[None, :] <= accepted[r0:r1, None]
            kv.keep_last(keep, first_row=r0, end=end)
        return Verdict(accepted, host[:, 1], path, features)

    def _greedy(self, kv: BatchKV, rows: list[Request], drafts: Drafts, t: int, extra: dict[str, Any]) -> Verdict:
        """`verify` where every row is greedy and verifies the same t - 1 draft tokens (plain
        decoding is t = 1; a batch drafting k is t = k + 1): the verdict `verify_chains`
        reaches, from the target's argmax alone, without the rule's per-row tensors, the split
        or, for plain decoding, a rollback (on a small model host time is most of a step's
        overhead). Each row is charged its t draws, as the general path's uniforms are."""
        n = len(rows)
        for r in rows:
            r.draws += t
        with padded_linears(self.model, n * t):
            out = kv.forward(self.model, self._ids(rows, drafts, t), None, **extra)  # (every slot real)
        end = kv.last_end
        # (features: read by the proposer's settle before the next forward, as the general path's)
        features = out.features if self.features is not None else None
        best = out.logits.argmax(-1)  # [n, t]
        if t == 1:
            return Verdict(torch.zeros(n, dtype=torch.long), best[:, 0].cpu(), None, features)
        # the leading run of draft tokens equal to the target's argmax (verified ones are real: >= 0)
        accepted = (best[:, :-1] == drafts.tokens[:, : t - 1]).cumprod(1).sum(1)
        host = torch.stack([accepted, best.gather(1, accepted[:, None]).squeeze(1)], 1).cpu()
        kv.keep_last(torch.arange(t)[None, :] <= host[:, :1], end=end)
        return Verdict(host[:, 0], host[:, 1], None, features)

    def peek(self, rows: list[Request], drafts: Drafts, draft_len: torch.Tensor) -> torch.Tensor:
        """The processed target distributions at every draft position, [rows, K + 1, V] on the
        device; the cache is left as it was (`Engine.peek_target`)."""
        kv, t = self._kv(), drafts.tokens.shape[1] + 1
        ids = self._ids(rows, drafts, t)
        valid = torch.arange(t)[None, :] <= draft_len[:, None]
        parents = slot_parents(drafts.parents, t) if drafts.parents is not None else None
        with padded_linears(self.model, len(rows) * t):
            out = kv.forward(self.model, ids, valid, parents=parents)
        kv.keep_last(torch.zeros(len(rows), t, dtype=torch.bool))
        s = RowSampling(rows, self.device)
        return process_logits(out.logits, s.temperature, s.top_p)
