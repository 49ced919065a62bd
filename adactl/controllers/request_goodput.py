"""Per-request goodput: each running request drafts its own length, the batch's budget
allocated where it pays (the adaptive-allocation poster's global allocation, on chains).

`GoodputLength` gives every row the same c*, from the batch's mean acceptance. Here each
running request i has its own conditional acceptance alpha_ij before drafting (an estimator
that speaks per request: `RequestAcceptance` by default) and survival s_ij = prod_{l <= j}
alpha_il. Drafting c_i tokens for row i yields 1 + E_i(c_i) tokens in expectation,
E_i(c) = sum_{j < c} s_ij, and the step takes T(c) (the step-time model on the step's shape:
rows, verify tokens sum_i (c_i + 1), the longest row, draft tokens, the draft's forwards
max_i c_i, prefill, context). The plan is

    c* = argmax_c  sum_i (1 + E_i(c_i)) / T(c)

over the candidates Speculative Verification scores after drafting (`prefix_candidates`):
for every survival threshold tau and cap m, c_i = min(m, #{j : s_ij >= tau}). A draft token
at position j of row i adds s_ij expected tokens and costs the same as any other row's at a
given cap, so for any total, giving tokens to the largest s_ij first is best; the cap prices
the longest row (the draft's forwards and a rectangular verify cost by it). A candidate
drafting more tokens in all must beat every one drafting fewer by `margin` (default 0, unlike
`GoodputLength`'s 3%: with hundreds of candidates a margin keeps a partial allocation that
the model prefers only because its rows' estimates are the luckiest, and in the replay of the
computed H100 it cost up to 9% at batch 64 with the true step costs, 0% without).

Rows the allocation leaves at 0 teach the estimator nothing, so in a step that drafts
anyway (no extra draft forward), each such row drafts one token with probability `explore`
(1%), and a step where no row drafts is, with that probability, a probe where every row
drafts one: without it a batch that stops drafting early (at 128 rows, after two steps of
evidence) never learns which of its requests would pay. (5% cost 2% at 256 rows in the
replay of the computed H100, where nothing pays, and learned no faster where drafting does.)
A row whose estimate is missing or not a number drafts 0 (the safe action for that row
alone) and is counted in `.fallback_rows`, which `ControlLoop` adds to its fallbacks
(`schedule:goodput-req:rows`).

Rows left at 0 fall behind the draft (`RequestView.draft_lag`), and a step that drafts for
one of them again first feeds the draft every row's lag, left-padded to the longest
(`runtime.shapes.catchup_of`): the drafting rows times the longest lag among them. A
candidate pays its catch-up once, spread over the steps its rows would go on drafting (the
mean tokens to go over its expected tokens a row-step), as `goodput` pays its own
(`goodput.with_catchup`), at the price per column the step-time model gives the step where
every row drafts one (`CatchUp`); each candidate also comes with its lagging rows left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

from adactl.estimators.request_acceptance import RequestAcceptance
from adactl.estimators.step_time import StepShape, StepTimePredictor
from adactl.interface import AcceptanceEstimate, Controller, Estimator, RequestView, ScheduleState
from adactl.runtime.shapes import catchup_of, chain_shapes, draft_work
from adactl.runtime.types import StepPlan

from .goodput import chain_step, shortest_within, sunk_prefill, switch_cost
from .sv import expected_gain, prefix_candidates

Shapes = Callable[[torch.Tensor], list[StepShape]]
"""Candidates [C, R] (lengths or depths per row) -> the shape of each one's step."""


@dataclass(frozen=True)
class CatchUp:
    """What the draft's catch-up adds to a candidate's step: its rows' lags, the mean tokens
    they have to go, and the step-time model's price of a column."""

    lags: np.ndarray  # [R] tokens each row emitted that the draft has not read
    left: float  # mean tokens to go a row
    per_column: float  # seconds a catch-up column costs

    @classmethod
    def of(cls, step_time: StepTimePredictor, views: list[RequestView], context: int) -> CatchUp | None:
        """None where no row lags (every step after a drafting one)."""
        lags = np.array([r.draft_lag for r in views], dtype=np.int64)
        columns = catchup_of(lags.tolist())
        if columns <= 0:
            return None
        shape = chain_step(len(views), 1, context)
        price = switch_cost(step_time, [shape], step_time.predict([shape]), columns)[0] / columns
        return cls(lags, float(np.mean([r.draft_room + 1 for r in views])), float(price))

    def caught_up(self, cands: torch.Tensor) -> torch.Tensor:
        """Candidates [C, R] with the rows that lag more than a drafting step leaves (2) at 0:
        the threshold-and-cap candidates give rows of equal survival equal lengths, so without
        these one lagging row could only draft with every row like it, padding their catch-up."""
        return cands * torch.from_numpy(self.lags <= 2).to(cands.dtype)

    def seconds(self, cands: torch.Tensor, tokens: np.ndarray) -> np.ndarray:
        """[C] the catch-up of candidates [C, R] that yield `tokens` [C] a step, a step's share."""
        drafting = cands.numpy() > 0
        columns = drafting.sum(1) * np.maximum((drafting * self.lags[None, :]).max(1) - 1, 0)
        steps = np.maximum(self.left * len(self.lags) / np.maximum(tokens, 1e-6), 1.0)
        return self.per_column * columns / steps


class RequestGoodput(Controller):
    name = "goodput-req"

    def __init__(self, step_time: StepTimePredictor, estimator: Estimator | None = None, margin: float = 0.0,
                 explore: float = 0.01, thresholds: int = 24, seed: int = 0) -> None:  # fmt: skip
        self.step_time = step_time
        self.pricing = step_time  # what a candidate costs this step: less a prefill it pays anyway (`act`)
        self.estimator = estimator if estimator is not None else RequestAcceptance()
        self.margin, self.explore = margin, explore
        self.taus = torch.linspace(0.0, 0.98, thresholds)
        self.rng = np.random.default_rng(seed)
        self.fallback_rows = 0  # rows whose estimate was missing or NaN: they drafted nothing

    def act(self, state: ScheduleState, utilities: AcceptanceEstimate) -> StepPlan:
        every = state.running
        running = [i for i, r in enumerate(every) if state.plan.run is None or r.request_id in state.plan.run]
        k = state.max_draft_len
        if not running or k == 0:
            return replace(state.plan, draft_len=0)
        alpha = utilities.alpha if utilities is not None else torch.zeros(0, k)
        if alpha.shape[0] != len(every):  # no per-request estimate: the safe action for all
            self.fallback_rows += len(running)
            return replace(state.plan, draft_len=0)
        alpha = alpha[running, :k].float()  # [R, K]
        bad = ~torch.isfinite(alpha).all(1)
        self.fallback_rows += int(bad.sum())
        alpha = torch.where(bad[:, None], torch.zeros_like(alpha), alpha.clamp(0.0, 1.0))
        views = [every[i] for i in running]
        room = torch.tensor([r.draft_room for r in views])
        context = sum(r.context_len for r in views)
        prefill = state.prefill_tokens
        self.pricing = sunk_prefill(self.step_time, prefill)  # (goodput.SunkPrefill)
        lengths, tree = self.choose(
            views,
            alpha,
            torch.where(bad, 0, torch.clamp(room, max=k)),  # (a threshold of 0 would give a bad row the cap)
            context,
            prefill,
            CatchUp.of(self.step_time, views, context),
        )
        if self.explore > 0:
            can = (lengths == 0) & (room > 0) & ~bad
            if lengths.max() > 0:  # a probe rides on a step that drafts anyway: rows at random
                can &= torch.from_numpy(self.rng.random(len(views)) < self.explore)
            elif self.rng.random() >= self.explore:  # or, now and then, a step of its own: every row
                can &= False
            lengths = torch.where(can, torch.ones_like(lengths), lengths)
        return self.plan_of(state.plan, views, lengths.tolist(), tree)

    def choose(self, views: list[RequestView], alpha: torch.Tensor, limit: torch.Tensor, context: int,
               prefill: int, catchup: CatchUp | None = None) -> tuple[torch.Tensor, bool]:  # fmt: skip
        """[R] draft lengths of the running rows, and whether they are tree depths (here: chains)."""
        return self.allocate(alpha, limit, context, prefill, catchup), False

    def plan_of(self, plan: StepPlan, views: list[RequestView], lengths: list[int], tree: bool) -> StepPlan:
        return replace(plan, draft_len={r.request_id: int(c) for r, c in zip(views, lengths)})

    def allocate(self, alpha: torch.Tensor, limit: torch.Tensor, context: int, prefill: int,
                 catchup: CatchUp | None = None) -> torch.Tensor:  # fmt: skip
        """[R] draft lengths maximising expected tokens per predicted second (the docstring's c*)."""
        return self.search(torch.cumprod(alpha, 1), limit, partial(chain_shapes, prefill=prefill, context=context),
                           bound=True, catchup=catchup)[0]  # fmt: skip

    def search(self, survival: torch.Tensor, limit: torch.Tensor, shapes: Shapes, bound: bool = False,
               catchup: CatchUp | None = None) -> tuple[torch.Tensor, float]:  # fmt: skip
        """Of the threshold-and-cap candidates on `survival` [R, K] (`prefix_candidates`), each
        priced as `shapes` says (the shapes of candidates [C, R]) and its `catchup`, the best
        lengths [R] and their expected tokens per second. `bound`: first `none_pays` (chain
        shapes; a catch-up only adds to a drafting step's cost, so the bound holds)."""
        none = self.none_pays(survival, limit, shapes) if bound else None
        if none is not None:
            return none
        cands = prefix_candidates(survival, limit, self.taus)  # [C, R]
        if catchup is not None:
            cands = torch.cat([cands, catchup.caught_up(cands)])
        index, rate = self.rated(cands, survival, shapes(cands), catchup)
        return cands[index].long(), rate

    def none_pays(self, survival: torch.Tensor, limit: torch.Tensor,
                  shapes: Shapes) -> tuple[torch.Tensor, float] | None:  # fmt: skip
        """No draft at all, with its rate, where no candidate can beat it; else None (search).

        A bound, 3K + 1 predictions instead of hundreds: a candidate whose longest row drafts m
        tokens yields at most R + the survival of every row's first min(m, limit) positions,
        and costs at least the cheapest of: one row drafting m, every row m, every row
        min(m, its limit) (step costs grow with the work, and a uniform step may cost less
        than a ragged one). Where for every m that falls within `margin` of plain decoding,
        the search would choose plain decoding. A draft that does not fit the workload ends
        here, where the search was the whole of this controller's cost: 0.8-1.4 ms a step on
        this CPU and 1.2-1.9 ms on an H200's host, against 1.3-9 ms steps (2026-12-04). A cost
        model whose steps can cost less for more work (`StepCostModel.grows_with_work`) gets no
        bound: the search."""
        if not getattr(self.step_time, "grows_with_work", True):
            return None
        rows = survival.shape[0]
        lim = limit.numpy().astype(np.int64)
        top = int(lim.max()) if rows else 0
        zero = torch.zeros(rows, dtype=torch.long)
        if top == 0:
            return zero, rows / max(float(self.pricing.predict(shapes(zero[None]))[0]), 1e-6)
        m = np.arange(1, top + 1)[:, None]  # [top, 1]
        within = np.minimum(lim[None, :], m)  # [top, R]: every row as far as it may, up to m
        alone = np.where(np.arange(rows)[None, :] == int(lim.argmax()), m, 0)  # one row drafts m
        # a ragged step (a split verify) can cost more than a uniform one with more tokens: the
        # cheapest of the three stands for every candidate of that longest row
        tried = shapes(torch.from_numpy(np.concatenate([np.zeros((1, rows), np.int64), alone,
                                                        np.broadcast_to(m, (top, rows)), within])))  # fmt: skip
        seconds = np.maximum(np.asarray(self.pricing.predict(tried), dtype=np.float64), 1e-6)
        plain, cheapest = rows / seconds[0], seconds[1:].reshape(3, top).min(0)  # [top]
        if cheapest.min() < seconds[0]:  # a model that prices drafting below plain decoding: no bound
            return None
        reach = np.concatenate([np.zeros((rows, 1)), np.cumsum(survival.numpy(), 1)], 1)  # [R, K + 1]
        gain = np.take_along_axis(reach, within.T, 1).sum(0)  # [top]: at most this gained
        if np.all((rows + gain) / cheapest <= plain * (1 + self.margin)):
            return zero, plain
        return None

    def best(self, cands: torch.Tensor, survival: torch.Tensor, context: int, prefill: int) -> int:
        """The index of the candidate lengths [C, R] (rows of survival [R, K]) with the most
        expected tokens per predicted second; of those within `margin` of it, the one drafting
        fewest tokens (ties: the first); a prefill priced as `act` prices it (`goodput.SunkPrefill`)."""
        self.pricing = sunk_prefill(self.step_time, prefill)
        return self.rated(cands, survival, chain_shapes(cands, prefill, context))[0]

    def rated(self, cands: torch.Tensor, survival: torch.Tensor, shapes: list[StepShape],
              catchup: CatchUp | None = None) -> tuple[int, float]:  # fmt: skip
        """`best` on candidates priced as `shapes` (one per candidate) and their `catchup`: its
        index and rate."""
        order = torch.argsort(cands.sum(1), stable=True)  # fewest draft tokens first: ties go to less
        tokens = (1 + expected_gain(survival).gather(1, cands[order].T.long())).sum(0).numpy()  # [C]
        seconds = self.pricing.predict([shapes[int(i)] for i in order])
        if catchup is not None:
            seconds = seconds + catchup.seconds(cands[order], tokens)
        rate = tokens / np.maximum(seconds, 1e-6)
        pick = shortest_within(rate, self.margin)
        return int(order[pick]), float(rate[pick])


def ragged_shape(lengths: torch.Tensor | list[int], prefill: int, context: int) -> StepShape:
    """The shape of a chain step whose rows draft and verify `lengths` tokens each."""
    ordered = sorted((int(c) for c in lengths), reverse=True)  # the engine's row order: longest draft first
    fed, forwards = draft_work(ordered)
    return StepShape.of_lengths(ordered, fed, prefill, context, forwards=forwards)
