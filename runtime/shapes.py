"""The shape of an engine step, in the terms its cost depends on, and the row ranges its
verify forwards take.

The lowest layer of the cost side: the engine splits its verify forwards with
`verify_split`, the replay engine and the step-time model (`adactl.estimators.step_time`)
describe steps with `StepShape` and count computed tokens with `verify_computed`, so all
three agree on what a step computes; the engine moves its rows by `arrangement` and
`dropping`, and the replay counts the KV those moves copy with them. Nothing here imports
the engine or transformers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from adactl.interface import StepRecord


@dataclass(frozen=True)
class StepShape:
    """What a step costs depends on (DESIGN.md: the staircase is in tokens per step)."""

    rows: int  # decode rows
    verify_tokens: int  # target tokens in the verify forward: sum over rows of (verified + 1)
    max_verify: int  # the longest row's verified + 1
    draft_tokens: int  # draft tokens proposed over all rows
    max_draft: int  # the longest draft (the draft runs this many forwards)
    prefill_tokens: int  # prompt tokens computed this step
    context_tokens: int  # sum of the decode rows' context lengths
    verify_computed: int = 0  # tokens the verify forwards compute, padding included (0: rows * max_verify)
    prefill_attention: int = 0  # query-key pairs the prefill's attention computes (`prefill_pairs`; 0: one prompt)
    span_tokens: int = 0  # rows x the longest row's context: what padded attention reads (0: context_tokens)
    moved_tokens: int = 0  # KV columns copied to move rows in the cache (the engine's `StepOutcome.moved_tokens`)
    catchup_tokens: int = 0  # the draft's catch-up columns past one a drafting row (`catchup_of`)

    def __post_init__(self) -> None:
        if self.verify_computed == 0:  # one [rows, max_verify] forward
            object.__setattr__(self, "verify_computed", self.rows * self.max_verify)
        if self.span_tokens == 0:  # every row as long as the mean (a shape made without the rows' contexts)
            object.__setattr__(self, "span_tokens", self.context_tokens)
        if self.prefill_attention == 0 and self.prefill_tokens:  # one chunk from an empty cache
            p = self.prefill_tokens  # (prefill_pairs([(0, p)]), inline: controllers make shapes every step)
            object.__setattr__(self, "prefill_attention", p * (p + 1) // 2)

    @classmethod
    def of_lengths(cls, verify: Sequence[int] | torch.Tensor, draft: Sequence[int] | torch.Tensor, prefill: int = 0,
                   context: int = 0, prefill_attention: int = 0, forwards: int | None = None,
                   span: int = 0, moved: int = 0, catchup: int = 0) -> StepShape:  # fmt: skip
        """The shape of a step whose rows (in the engine's order, longest draft first) verify
        `verify[i]` of their drafted tokens and feed the draft `draft[i]` tokens in `forwards`
        forwards (None: a chain step, max(draft); a tree's come from `draft_work`); the engine
        splits the verify forward as `verify_split` does. Python lists inside: this runs on every
        step (the online step-cost update), and torch's per-call overhead dominates [B] tensors."""
        cut = [int(x) for x in (verify.tolist() if isinstance(verify, torch.Tensor) else verify)]
        drafted = [int(x) for x in (draft.tolist() if isinstance(draft, torch.Tensor) else draft)]
        rows = len(cut)
        return cls(
            rows=rows,
            verify_tokens=sum(cut) + rows,
            max_verify=max(cut) + 1 if rows else 0,
            draft_tokens=sum(drafted),
            max_draft=(max(drafted) if rows else 0) if forwards is None else forwards,
            prefill_tokens=prefill,
            context_tokens=context,
            verify_computed=verify_computed(cut),
            prefill_attention=prefill_attention,
            span_tokens=span,
            moved_tokens=moved,
            catchup_tokens=catchup,
        )

    @classmethod
    def of(cls, record: StepRecord) -> StepShape:
        """The shape of a step that ran (an `adactl.interface.StepRecord`)."""
        d = record.drafts
        o = record.outcome
        prefill, (context, span) = int(o.prefill_tokens), context_of(d.context_len)
        fed, forwards = draft_work(d.draft_len, d.parents)
        return cls.of_lengths(record.verify_len.cpu(), fed, prefill, context, int(o.prefill_attention), forwards, span,
                              int(o.moved_tokens), int(o.catchup_tokens))  # fmt: skip

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(StepShape)]


def context_of(context_len: Sequence[int] | torch.Tensor | np.ndarray) -> tuple[int, int]:
    """(context_tokens, span_tokens) of a step's decode rows from their context lengths: the
    sum, and the rows times the longest. The engine's attention over a batch spans the widest
    row's columns (`runtime.kv`: one buffer, per-row masks), so a step of short rows beside one
    long one reads as much KV as a step of long rows."""
    c = context_len.tolist() if isinstance(context_len, (torch.Tensor, np.ndarray)) else list(context_len)
    return int(sum(c)), len(c) * int(max(c, default=0))


def catchup_of(lags: Sequence[int]) -> int:
    """A step's draft catch-up columns from its drafting rows' lags (tokens each emitted that
    the draft model has not read): the draft's first forward feeds every row its lag,
    left-padded to the longest, so it computes rows x the longest lag; past one a row (a
    step after a drafting one feeds one or two) that is what a stretch without drafting
    costs the step that drafts again. On the 2-core CPU a k = 1 step at batch 64 after 32
    plain steps drafted for 86-93 ms against 25-30 ms after one (0.03 ms a column;
    `docs/issue30/catchup`)."""
    return len(lags) * max(max(lags) - 1, 0) if lags else 0


def arrangement(segment: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """The row order that lays rows out as consecutive segments of `sizes` (the segment of
    row i is `segment[i]`) moving as few rows as possible: position p takes row perm[p], and a
    row already inside its segment stays put. `Rows.arrange` moves the engine's rows by it (each
    moved row copies its KV) and the replay counts the moves with it."""
    slot = [g for g, n in enumerate(sizes) for _ in range(n)]  # the segment of each position
    order: list[int | None] = [i if g == slot[i] else None for i, g in enumerate(segment)]
    movers: list[list[int]] = [[] for _ in sizes]
    for i, g in enumerate(segment):
        if order[i] is None:
            movers[g].append(i)
    return [i if i is not None else movers[slot[pos]].pop() for pos, i in enumerate(order)]


def moved_rows(perm: Sequence[int]) -> int:
    """Rows a row order moves (each copies its KV): those not already in their place."""
    return sum(src != dst for dst, src in enumerate(perm))


def dropping(rows: int, drop: set[int]) -> list[int]:
    """The row order without rows `drop`: rows from the end move into their places (the others
    stay), as `Rows.drop` does."""
    keep = rows - len(drop)
    tail = [i for i in range(keep, rows) if i not in drop]
    return [i if i not in drop else tail.pop() for i in range(keep)]


def draft_work(draft_len: Sequence[int] | torch.Tensor, parents: torch.Tensor | None = None) -> tuple[list[int], int]:
    """Tokens each row feeds the draft model this step, and the forwards the draft runs. A chain
    of k tokens: k tokens in k forwards. A tree (`parents` [B, K], nodes best first, a row's
    first draft_len[i] valid) grows level by level: as many forwards as its deepest row has
    levels, and per row one token (the last one) and then, for each level but the last, the
    nodes expanded there: min(width, nodes at that level), width the most children any of its
    nodes has (what `adactl.runtime.draft.Proposer.trees` feeds, counted on the nodes kept)."""
    lens = [int(x) for x in (draft_len.tolist() if isinstance(draft_len, torch.Tensor) else draft_len)]
    if parents is None:
        return lens, max(lens, default=0)
    par = parents.cpu().numpy()
    b, k = par.shape
    valid = np.arange(k)[None, :] < np.asarray(lens, dtype=np.int64)[:, None]
    level = node_levels(par)
    depth = np.where(valid, level + 1, 0).max(1, initial=0)  # levels per row
    children = np.zeros((b, k + 1), dtype=np.int64)  # slot 0: the root
    np.add.at(children, (np.nonzero(valid)[0], par[valid] + 1), 1)
    width = children.max(1)
    counts = np.zeros((b, k + 1), dtype=np.int64)  # nodes per level
    np.add.at(counts, (np.nonzero(valid)[0], level[valid]), 1)
    expanded = np.minimum(counts, width[:, None]) * (np.arange(k + 1)[None, :] < (depth - 1)[:, None])
    fed = np.where(depth > 0, 1 + expanded.sum(1), 0)
    return fed.tolist(), int(depth.max(initial=0))


def node_levels(parents: np.ndarray) -> np.ndarray:
    """Each node's depth (0: a child of the root; -1: no node) from parents [..., N] (best
    first: parents before children; -2 for no node), one column at a time over every row."""
    level = np.full(parents.shape, -1, dtype=np.int64)
    for j in range(parents.shape[-1]):
        p = parents[..., j]
        above = np.take_along_axis(level, np.maximum(p, 0)[..., None], -1)[..., 0]
        level[..., j] = np.where(p == -1, 0, np.where(p >= 0, above + 1, -1))
    return level


def prefill_pairs(chunks: Iterable[tuple[int, int]]) -> int:
    """Query-key pairs the attention of prefill chunks computes: a chunk of `size` prompt tokens
    after `cached` ones attends to cached + (i + 1) keys at its i-th token, so size x cached +
    size (size + 1) / 2 (causal). What a step's prefill attention costs is the sum over its
    prompts, not the square of its total: 32 prompts of 150 tokens are 0.36M pairs, one prompt
    of 4,800 is 11.5M."""
    return sum(size * cached + size * (size + 1) // 2 for cached, size in chunks)


SPLIT_SAVING, SPLIT_TOKENS = 0.4, 48  # `verify_split`'s defaults


def verify_split(cut: torch.Tensor | Sequence[int], min_saving: float = SPLIT_SAVING,
                 min_tokens: int = SPLIT_TOKENS) -> list[tuple[int, int]]:  # fmt: skip
    """Row ranges for the verify forwards: the whole batch, or two ranges split where the
    computed tokens sum_range rows * (longest cut + 1) are smallest, when that saves at least
    `min_saving` of the [rows, longest + 1] rectangle of at least `min_tokens` tokens (a
    second forward re-reads the weights, which only a large saving pays for)."""
    widths = [int(c) + 1 for c in (cut.tolist() if isinstance(cut, torch.Tensor) else cut)]
    return _split(widths, min_saving, min_tokens)


def _split(widths: list[int], min_saving: float = SPLIT_SAVING,
           min_tokens: int = SPLIT_TOKENS) -> list[tuple[int, int]]:  # fmt: skip
    n = len(widths)
    if n < 2:
        return [(0, n)]
    whole = n * max(widths)
    if whole < min_tokens:
        return [(0, n)]
    head = list(itertools.accumulate(widths, max))  # longest of rows [0, m]
    tail = list(itertools.accumulate(reversed(widths), max))[::-1]  # longest of rows [m, n)
    cost, m = min((m * head[m - 1] + (n - m) * tail[m], m) for m in range(1, n))
    return [(0, m), (m, n)] if cost <= (1 - min_saving) * whole else [(0, n)]


def chain_shapes(lengths: torch.Tensor | np.ndarray, prefill: int = 0, context: int = 0) -> list[StepShape]:
    """The shapes of chain steps, one per row of `lengths` [C, R] (a candidate: every request's
    draft length, verified whole): what `StepShape.of_lengths` gives for the lengths in the
    engine's order (longest first) with a chain's draft work, computed for all candidates at
    once. A controller prices hundreds of candidates a step, and the per-candidate Python took
    16 µs at 8 rows and 53 µs at 32 (2026-12-04)."""
    c = -np.sort(-np.asarray(lengths, dtype=np.int64).reshape(len(lengths), -1), axis=1)  # [C, R] longest first
    n, rows = c.shape
    if rows == 0:
        return [StepShape(0, 0, 0, 0, 0, prefill, context) for _ in range(n)]
    widths = c + 1
    whole = rows * widths[:, 0]
    computed = whole
    if rows >= 2:  # `_split` on rows longest first: the longest of rows [0, m) is the first, of [m, R) row m
        m = np.arange(1, rows)
        best = (m[None, :] * widths[:, :1] + (rows - m)[None, :] * widths[:, 1:]).min(1)
        computed = np.where((whole >= SPLIT_TOKENS) & (best <= (1 - SPLIT_SAVING) * whole), best, whole)
    drafted = c.sum(1)
    return [StepShape(rows, d + rows, longest + 1, d, longest, prefill, context, v)
            for d, longest, v in zip(drafted.tolist(), c[:, 0].tolist(), computed.tolist())]  # fmt: skip


def verify_computed(cut: torch.Tensor | Sequence[int]) -> int:
    """Target tokens the verify forwards of a step with these verify lengths (rows in the
    engine's order: longest draft first) compute, padding included. (Python lists: the step
    cost model asks for every candidate cut of every step.)"""
    widths = [int(c) + 1 for c in (cut.tolist() if isinstance(cut, torch.Tensor) else cut)]
    return sum((r1 - r0) * max(widths[r0:r1]) for r0, r1 in _split(widths) if r1 > r0)
