"""Chunked prompt prefill: up to a token budget per step, in the prefill caches (`Rows`).

Prompts are cut into chunks that fit the budget; chunks of similar length share one forward,
left-padded so that the last column is every row's last token (padding wastes at most a
quarter of a forward's tokens). The draft sees the same chunks (a feature draft with the
target's features of the position before each token). Prompts that complete report the
target's logits at their last token; the engine samples their first tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .rows import Request, Rows
from .shapes import prefill_pairs


class Prefill:
    """Runs prompt chunks through the target (and the draft) into `rows`' prefill caches."""

    def __init__(self, target: Any, draft: Any, feature_draft: bool, rows: Rows, max_batch_size: int) -> None:
        self.target, self.draft, self.feature_draft = target, draft, feature_draft
        self.rows, self.max_batch_size = rows, max_batch_size

    def run(
        self, budget: int, admit: list[Request], grow: Callable[[Request, int], bool] | None = None
    ) -> tuple[list[Request], torch.Tensor | None, int, int]:
        """Compute up to `budget` prompt tokens of `admit` (in order). Returns the requests
        whose prompt is now complete, the target's logits at their last token [n, V] (on the
        device; None if none completed), the tokens computed and their attention's query-key
        pairs (`prefill_pairs`: what the step-cost model reads).

        grow: takes the KV memory for a request to hold n tokens, or says it cannot (False):
        that request and every one behind it wait (head of the line). A prompt takes the blocks
        for all of it at its first chunk (vLLM v1 admits a prompt only when its whole sequence
        fits): prompts taking blocks chunk by chunk could together hold the whole pool, each
        waiting for blocks another holds."""
        chunks: list[tuple[Request, int]] = []
        used = 0
        active = len(self.rows.running) + len(self.rows.prefilling)
        # prompts part-way through first: they hold rows and KV blocks, and a prompt that waits
        # for blocks in front of them would wait for ever (vLLM schedules them with the running)
        admit = [r for r in admit if r.prefilled] + [r for r in admit if not r.prefilled]
        for req in admit:
            if used >= budget:
                break
            if req.prefilled == 0:
                if active >= self.max_batch_size:
                    continue
                active += 1
            size = min(len(req.to_prefill) - req.prefilled, budget - used)
            if grow is not None and not grow(req, len(req.to_prefill)):  # (its whole prompt: see `run`)
                break
            chunks.append((req, size))
            used += size
        if not chunks:
            return [], None, 0, 0
        pairs = prefill_pairs((req.prefilled, size) for req, size in chunks)
        self.rows.start_prefill([r for r, _ in chunks if r.prefilled == 0])
        # participants first, longest chunk first, so each group below is a contiguous row range
        chunks.sort(key=lambda c: -c[1])
        prefilling = self.rows.prefilling
        order = [r for r, _ in chunks] + [r for r in prefilling if all(r is not c for c, _ in chunks)]
        self.rows.permute_prefill([prefilling.index(r) for r in order])
        done: list[Request] = []
        last: list[torch.Tensor] = []
        row = 0
        for group in length_groups([size for _, size in chunks]):
            members = chunks[row : row + len(group)]
            logits = self._forward(members, row)
            row += len(group)
            finished = [i for i, (req, _) in enumerate(members) if req.prefilled == len(req.to_prefill)]
            if finished:
                done += [members[i][0] for i in finished]
                last.append(logits[finished])
        return done, torch.cat(last) if last else None, used, pairs

    def _forward(self, members: list[tuple[Request, int]], first_row: int) -> torch.Tensor:
        """One forward over prompt chunks of similar length, left-padded so that the last
        column is every row's last token; returns those logits [n, V]."""
        width = max(size for _, size in members)
        ids = torch.zeros(len(members), width, dtype=torch.long)
        valid = torch.zeros(len(members), width, dtype=torch.bool)
        for i, (req, size) in enumerate(members):
            ids[i, width - size :] = torch.tensor(req.to_prefill[req.prefilled : req.prefilled + size])
            valid[i, width - size :] = True
            req.prefilled += size
        device = self.rows.device
        ids = ids.to(device)  # (valid stays on the host, with the cache's bookkeeping)
        extra: dict[str, Any] = {"feature_fn": self.draft.target_features} if self.feature_draft else {}
        out = self.rows.prefill_target.forward(self.target, ids, valid, logits_to_keep=1, first_row=first_row, **extra)
        if self.rows.prefill_draft is not None:
            if self.feature_draft:
                extra = {"features": self._features(members, out.features)}
            else:
                extra = {}
            self.rows.prefill_draft.forward(self.draft, ids, valid, logits_to_keep=1, first_row=first_row, **extra)
        return out.logits[:, -1]

    def _features(self, members: list[tuple[Request, int]], hidden: torch.Tensor) -> torch.Tensor:
        """Feature-draft inputs for a left-padded prefill chunk: each token is paired with the
        target feature of the position before it (the previous chunk's last, or zeros at the
        prompt's start). Updates each request's last feature."""
        width = hidden.shape[1]
        feats = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
        for i, (req, size) in enumerate(members):
            if req.last_feature is not None:
                feats[i, width - size] = req.last_feature
            req.last_feature = hidden[i, -1].clone()
        return feats


def length_groups(sizes: list[int], max_padding: float = 0.25) -> list[list[int]]:
    """Split sizes (sorted longest first) into runs whose padding to the run's first size
    wastes at most `max_padding` of the computed tokens."""
    groups: list[list[int]] = []
    for size in sizes:
        if groups and len(groups[-1]) * groups[-1][0] + groups[-1][0] <= (1 + max_padding) * (sum(groups[-1]) + size):
            groups[-1].append(size)
        else:
            groups.append([size])
    return groups
