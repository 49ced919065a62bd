"""Goodput-optimal candidate count (the adaptive-allocation poster): how many tokens to draft.

Before drafting, with conditional acceptance alpha_j per position from an estimator that can
speak before drafting (the per-position moving average by default), drafting c tokens per
running request yields in expectation tokens(c) = 1 + sum_{j < c} prod_{i <= j} alpha_i
per request, and the step takes T(c) (the step-time model on the shape a c-token step has:
rows, rows * (c + 1) verify tokens, rows * c draft tokens, the prefill the plan allows,
the running requests' context). The controller drafts

    c* = argmax_{c in 0..K}  R * tokens(c) / T(c)          (R running requests)

every step, so the choice follows the load: as the batch grows, verification stops being nearly
free and c* falls to 0. A longer draft must beat every shorter one by `margin` (3%) to be
chosen (1% at a run's end, below): near a tie the step-cost model cannot tell the two apart (a
CPU step varies by 5-10% between repetitions of one shape), the acceptance estimate moves
between steps, and a draft costs what the model does not see (rows that finish at different
steps, a companion's work), so a tie goes to drafting less. (Measured, issue 30: with the
moving average's short memory (decay 0.98), `make bench` run 9 missed greedy batch 4 at 0.955,
and the replay of run 8's profile put 7 of 56 cells under 0.97 with 3%, 3 with 6%, which was
the default from 2026-12-04. With its longer memory (decay 0.995, 2026-12-05) the estimate
moves half as much, and the replays favour 3% again: run 8's profile, batch 1-64, both
temperatures, 4 seeds, 2 cells of 56 under 0.97 with 3% against 3 with 6%, mean 0.9999 against
0.9988; the computed H100 with recorded per-request acceptance (the `SpecDecode-v0-h100`
evaluation's `goodput`), where adjacent lengths are a few percent apart at small batch, 3%
gains 0.9-3.2% over 6% on its four workloads and 4-7% at batch 1-16 on held-out ShareGPT
requests.) `adactl export` uses the same 3% (`goodput_length`).

When nothing waits (no request would take a finished row's place: the end of a wave, a batch
job, a quiet server) and more than one row runs, tokens a second is the wrong objective: the
run ends when its last row does. A row's tokens a step are random, so the last row is an
unlucky one, and a longer draft shortens the run less than it raises the mean. Then c*
minimises the expected time until every running row is done, `makespan_rates`: for each c, the
chance that a row with m tokens to go is done within n steps (`done_within`: exact up to 64
tokens, `done_exactly`; the renewal process's normal approximation beyond), hence the rows
still running at each step on the way, each step priced at its expected rows (finished rows
leave the batch; the step-cost model at each row count, not linear between 1 and R:
`makespan_rates`). (Measured, issue 30: at greedy batch 8, a one-wave cell of `make bench`,
fixed k = 1 and k = 2 tie and the throughput rule drafted 1.28-1.48 tokens a row-step, ending
in k = 1's 24 steps at the mix's cost: 0.955-0.974 of the best fixed k in runs 38-41. The
replay reproduces it with 5% step noise: runs 38-41's profiles x 6 seeds, 0.986 on average,
0.963 the lowest; with this rule 1.008 and 1.003 (docs/issue30/drain/sweep.py). The same
replay, batch 1-64 at both temperatures, moves the other cells by -1.3 to +0.9%: it drafts less
at batch 2-4, where its model of a wave's end is within the profile's error of the truth. `make
bench` runs 42 and 43 on it met every cell, greedy batch 8 0.998 and 0.982. Its decision took
0.55-0.67 ms a step there, the throughput rule's 0.25, nearly all of it a recursion of one
numpy call a step to go; the chances now come from the step's generating function in five
calls, `done_exactly`.) Under this rule a longer draft must beat every shorter one by
`end_margin` (1%), not 3%: it prices what the margin stands for in the throughput rule's rates,
rows that finish at different steps, and at each decision of real draws it is within 2% of a
Monte Carlo of the rest of the run on its own inputs. (Measured, issue 30, the replay of `make
bench`'s batch 2-8 cells on runs 53-55's and an AMD EPYC's profiles, 8 seeds each, 5% step
noise: `goodput` / best fixed k 0.9964 on average with 3%, 13 of 192 cells under 0.97; with 1%
1.0007 and 5: +1.5-2.4% at batch 2, +0.4-1.6% at 0.7 batch 4, -0.1 to -1.3% at batch 8;
docs/issue30/run_end/README.md.) `drain=False` keeps the throughput rule always.

When the step-cost model learns online (`update`, adactl.estimators.step_cost), the served
steps are all it learns from: a model that starts out thinking verification too dear would
never draft, and so never see that it is cheap. So a step may probe a neighbour of c* (every
row drafts c* + 1, or c* - 1): with probability `explore` (3%) times the larger of the
neighbours' weights, going to a neighbour in proportion to its weight, novelty x plausibility:
- novelty n0 / (n0 + n), n the recent whole-batch steps the model holds at this batch size and
  length (n0 = `novelty`, 2): once a neighbour has been measured, probing it again is rarely
  worth a step;
- plausibility erfc(gap / (sqrt 2 sd)), twice the chance that the neighbour is in truth the
  faster, where gap = log(rate(c*) / rate(c)) and sd is the model's uncertainty of the two
  lengths' cost ratio (`ratio_sd`: the online surface's posterior, wide where nothing was
  measured, at least log 2 with another machine's profile); 1 where the neighbour is predicted
  at least as fast, or the model has no `ratio_sd`. A neighbour predicted at 60% of c*'s
  goodput is not worth a step (on this machine's own profile: weight 0.03); one within the
  model's error is. (Measured, make bench run 5, issue 30: at batch 32, where k = 1 ran at
  0.79 of plain decoding, goodput drafted on a few of a run's 32 steps and ran at 0.94-0.95
  of plain decoding.)
Probes are whole-batch steps, and none is taken on a step that prefills: only a step where
every row drafts the same length, and nothing else, teaches the model the ratio of one draft
length to another (the others teach its levels only).

A draft that resumes after a stretch of plain decoding first catches up on every token its
rows emitted meanwhile (`RequestView.draft_lag`, `runtime.shapes.catchup_of`; the step-cost
basis's draft catch-up): on the 2-core CPU, after 32 plain steps, a quarter of a plain step at
batch 16 and nearly half at batch 64 (`docs/issue30/catchup`). Unpriced, a controller near
the tie between plain decoding and k = 1 drafts now and then and pays it on every drafting
step (`make bench` runs 49-50: batch 16, greedy, 3-11 drafting steps of 32, 0.953-0.965 of
plain decoding), and the probe's recorded cost put it on k = 1 itself. Charged to the one
step that pays it, a long enough stretch would never end: the catch-up grows with it. So a
length c > 0 pays it once, spread over the steps its rows (`left` tokens to go on average)
would go on drafting c under the throughput rule, added to the run's time under the
makespan rule.

A step that also prefills (a request admitted while others decode) pays for the prefill
whatever it drafts. Its own tokens per second, R tokens(c) / (T(c) + prefill), counts that
time against plain decoding as much as against drafting, so beside a long enough prompt any
draft looks worth it: on the computed H100 x Llama-3.1-8B at 128 rows and a 300-token prompt,
k = 1 comes out 11% ahead, while what it adds (0.48 tokens a row) for what it costs on top
(6 ms) is 1% short of plain decoding's own rate. What maximises tokens over time in the long
run (the ratio of sums) is drafting where the draft's marginal rate beats the rate the server
keeps otherwise. So the rates of a prefilling step are priced without the prefill's cost on a
plain decoding step of the same rows, T(plain + prefill) - T(plain) (`SunkPrefill`): the
choice is that of the same rows decoding alone, less where a draft costs more beside a prefill
than alone (past the linear layers' knee). `goodput-req` and the tree controllers price their
candidates the same way. (Measured, issue 34, `bench spec --replay --profile
h100-llama-3.1-8b --saturated 4`, where a finished request is replaced at once, so most steps
at 64-256 rows prefill one: `goodput` / best fixed k at 128 rows went from 0.952-0.974 to
0.995-1.010 on the three workloads, at 256 from 0.958-0.990 to 0.987-1.003, and `goodput-req`
from 0.948-0.969 to 1.002-1.009 and 0.935-0.988 to 0.996-1.001; batch 1-32 within 1%, since a
step prefills there only now and then. docs/per_request.md, the learned policy in the bench.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from scipy.special import ndtr

from adactl.estimators.moving_average import MovingAverage
from adactl.estimators.step_time import StepShape, StepTimePredictor
from adactl.interface import AcceptanceEstimate, Controller, Estimator, ScheduleState
from adactl.runtime.shapes import catchup_of
from adactl.runtime.types import StepPlan


class GoodputLength(Controller):
    name = "goodput"

    def __init__(self, step_time: StepTimePredictor, estimator: Estimator | None = None, explore: float = 0.03,
                 margin: float = 0.03, seed: int = 0, novelty: float = 2.0, drain: bool = True,
                 end_margin: float = 0.01) -> None:  # fmt: skip
        self.step_time = step_time
        self.estimator = estimator if estimator is not None else MovingAverage()
        learns = hasattr(step_time, "update") and getattr(step_time, "refine", True)
        self.explore = explore if learns else 0.0
        self.margin, self.novelty, self.drain, self.end_margin = margin, novelty, drain, end_margin
        self.rng = np.random.default_rng(seed)

    def _weight(self, rates: np.ndarray, best: int, c: int, rows: int, context: int) -> float:
        """Neighbour c's probe weight: novelty x plausibility (the module docstring)."""
        shape, at = chain_step(rows, c, context), chain_step(rows, best, context)
        evidence = getattr(self.step_time, "evidence", None)
        novelty = 1.0 if evidence is None else self.novelty / (self.novelty + float(evidence(shape)))
        gap = math.log(max(rates[best], 1e-12) / max(rates[c], 1e-12))
        ratio_sd = getattr(self.step_time, "ratio_sd", None)
        if gap <= 0 or ratio_sd is None:
            return novelty
        sd = float(ratio_sd(shape, at))
        return novelty * (math.erfc(gap / (math.sqrt(2.0) * sd)) if sd > 0 else 0.0)

    def act(self, state: ScheduleState, utilities: AcceptanceEstimate) -> StepPlan:
        running = [r for r in state.running if state.plan.run is None or r.request_id in state.plan.run]
        rows, k = len(running), state.max_draft_len
        if rows == 0 or k == 0:
            return replace(state.plan, draft_len=0)
        # one alpha per position for the batch: the mean over running requests
        alpha = utilities.alpha.mean(0) if utilities.alpha.numel() else torch.zeros(k)
        context = sum(r.context_len for r in running)
        prefill = state.prefill_tokens
        catchup = catchup_of([r.draft_lag for r in running])
        left = torch.tensor([r.draft_room + 1 for r in running], dtype=torch.float32)
        margin = self.margin
        if state.waiting or rows == 1 or not self.drain:
            rates = goodput_rates(self.step_time, alpha, rows, context, prefill, catchup, float(left.mean()))
        else:
            rates, margin = makespan_rates(self.step_time, alpha, left, context, catchup=catchup), self.end_margin
        best = shortest_within(rates, margin)
        draw = self.rng.random() if self.explore > 0 and prefill == 0 else 1.0
        if draw < self.explore:  # a probe: the more novel and plausible neighbour the likelier (weights <= 1,
            near = [c for c in (best - 1, best + 1) if 0 <= c < len(rates)]  # so no other step needs them)
            weight = np.array([self._weight(rates, best, c, rows, context) for c in near])
            if draw < self.explore * float(weight.max()):
                best = int(self.rng.choice(near, p=weight / weight.sum()))
        return replace(state.plan, draft_len=best)


class SunkPrefill:
    """A step-time model for choosing what to draft on a step that also prefills: each shape's
    seconds less its prefill's cost on a plain decoding step of the same rows, T(plain +
    prefill) - T(plain) (the module docstring: the prefill is paid whatever is drafted, and a
    step's own tokens per second would count it against plain decoding). Shapes without a
    prefill, and every other attribute, are the wrapped model's. Made for one decision: it keeps
    each prefill's cost once priced (`goodput-req` prices its bound and its search apart)."""

    def __init__(self, inner: StepTimePredictor) -> None:
        self.inner = inner
        self.sunk: dict[tuple[int, ...], float] = {}  # prefill cost on plain decoding, by rows, context and prefill

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict(self, shapes: list[StepShape]) -> np.ndarray:
        keys = [_prefill_key(s) if s.prefill_tokens else None for s in shapes]
        new = {k: s for k, s in zip(keys, shapes) if k is not None and k not in self.sunk}
        plain: list[StepShape] = []  # a pair of plain steps, with and without the prefill, per new key
        for s in new.values():
            ref = StepShape(s.rows, s.rows, 1 if s.rows else 0, 0, 0, s.prefill_tokens, s.context_tokens,
                            prefill_attention=s.prefill_attention, span_tokens=s.span_tokens)  # fmt: skip
            plain += [ref, replace(ref, prefill_tokens=0, prefill_attention=0)]
        out = np.asarray(self.inner.predict([*shapes, *plain]), dtype=np.float64)  # one call: its overhead is per call
        n = len(shapes)
        for i, k in enumerate(new):
            self.sunk[k] = max(out[n + 2 * i] - out[n + 2 * i + 1], 0.0)
        return out[:n] - np.array([0.0 if k is None else self.sunk[k] for k in keys])


def _prefill_key(s: StepShape) -> tuple[int, ...]:
    return (s.rows, s.context_tokens, s.span_tokens, s.prefill_tokens, s.prefill_attention)


def sunk_prefill(step_time: StepTimePredictor, prefill: int) -> StepTimePredictor:
    """`step_time` for a step that prefills `prefill` tokens: `SunkPrefill` of it where it does."""
    return SunkPrefill(step_time) if prefill > 0 else step_time


def chain_step(rows: int, c: int, context: int, prefill: int = 0) -> StepShape:
    """The shape of a step where each of `rows` drafts c tokens and verifies all of them (no
    catch-up: `switch_cost` prices it)."""
    return StepShape(rows, rows * (c + 1), c + 1, rows * c, c, prefill, context)


def lagging(shapes: list[StepShape], catchup: int) -> list[StepShape]:
    """`shapes` with the draft's catch-up on `catchup` columns added where they draft (none
    when nothing lags)."""
    if catchup <= 0:
        return []
    return [replace(s, catchup_tokens=catchup if s.max_draft else 0) for s in shapes]


def switch_cost(step_time: StepTimePredictor, shapes: list[StepShape], seconds: np.ndarray, catchup: int,
                behind: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """[len(shapes)] seconds the draft's catch-up on `catchup` columns adds to each shape, whose
    own cost is `seconds` (0 where it does not draft); `behind`: the `lagging` shapes' predicted
    seconds where the caller priced them in its own call (numpy's overhead is per call)."""
    if catchup <= 0:
        return np.zeros(len(shapes))
    if behind is None:
        behind = step_time.predict(lagging(shapes, catchup))
    return np.maximum(behind - seconds, 0.0)


def spread(switch: np.ndarray, left: float, gain: np.ndarray) -> np.ndarray:
    """A one-off cost `switch` [C] paid over the steps its rows would go on drafting: `left`
    tokens to go a row at `gain` [C] tokens a row-step (at least one step). Charged to one
    step, a long enough stretch without drafting would never end (its catch-up grows with it)."""
    return switch / np.maximum(left / gain, 1.0)


def with_catchup(step_time: StepTimePredictor, shapes: list[StepShape], seconds: np.ndarray, catchup: int,
                 left: float, gain: np.ndarray) -> np.ndarray:  # fmt: skip
    """`seconds` [len(shapes)] plus each shape's `switch_cost`, `spread` over the steps its rows
    would go on drafting."""
    return seconds + spread(switch_cost(step_time, shapes, seconds, catchup), left, gain)


def goodput_rates(step_time: StepTimePredictor, alpha: torch.Tensor, rows: int, context: int,
                  prefill: int = 0, catchup: int = 0, left: float = 1.0) -> np.ndarray:  # fmt: skip
    """[len(alpha) + 1] predicted tokens per second of drafting c = 0 .. len(alpha) tokens per
    row. A draft that must first catch up on `catchup` columns (rows that have not drafted for
    a while) pays for it once, spread over the steps its rows, `left` tokens to go on average,
    would go on drafting c: a step's rate alone would never draft again after a long stretch
    without (its catch-up grows with it), however much drafting would pay."""
    k = len(alpha)
    gain = torch.cat([torch.zeros(1), torch.cumprod(alpha.float(), 0).cumsum(0)]).numpy()  # [K + 1]
    shapes = [chain_step(rows, c, context, prefill) for c in range(k + 1)]
    step_time = sunk_prefill(step_time, prefill)  # the prefill is paid whatever is drafted
    priced = step_time.predict([*shapes, *lagging(shapes, catchup)])  # one call: numpy's overhead is per call
    seconds = priced[: k + 1]
    seconds = seconds + spread(switch_cost(step_time, shapes, seconds, catchup, priced[k + 1 :]), left, 1 + gain)
    return rows * (1 + gain) / np.maximum(seconds, 1e-6)


def makespan_rates(step_time: StepTimePredictor, alpha: torch.Tensor, left: torch.Tensor, context: int,
                   exact: int = 64, catchup: int = 0) -> np.ndarray:  # fmt: skip
    """[len(alpha) + 1] tokens per second of drafting c = 0 .. len(alpha) tokens per row when
    the run ends with its last row (nothing waits): `left` [R] tokens each row has to go.

    Step n costs T_c(A_n), A_n the rows still running (finished rows leave the batch), so the
    run's time is sum_n P(A_n > 0) E[T_c(A_n) | A_n > 0], taken as
    P(A_n > 0) T_c(E[A_n | A_n > 0]) with T_c the step-cost model's at each of `row_counts(R)`,
    linear between them. (Measured, issue 30: on an AMD EPYC's own profile a plain step costs
    102 ms at one row and 195-242 at 2-8, a k = 1 step 185 and 220-297; priced linear in rows
    between 1 and R, as this rule was until 2026-12-07, a plain step at 2-7 rows looked up to
    40% cheaper than the profile says, and at 0.7 batch 8 `goodput` decoded plain from the first
    finished row on, 0.954 of fixed k = 1 over four draws priced by that very profile (with this
    rule and `end_margin`, 0.999). At each decision of those draws this rule's ratios of k = 1's
    and k = 2's rate to plain decoding's are within 2% of a Monte Carlo of the rest of the run
    on the profile's exact shapes, where the linear one's were 5% under on average and up to
    22%; docs/issue30/run_end/README.md.)

    Beyond `exact` tokens, only rows with at least half the most tokens to go, binned by 1%, are
    asked when they are done (the renewal process's normal approximation); the others run for
    their mean steps (they are many standard deviations short of the last), so a decision at 256
    rows of long outputs takes 2-3 ms on a 2-core AMD EPYC. A draft's catch-up on `catchup`
    columns is paid once (`goodput_rates`)."""
    k, rows = len(alpha), len(left)
    a = alpha.double().numpy()
    lefts, rows_at = np.unique(left.long().numpy(), return_counts=True)  # rows with as many tokens to go share
    far = lefts[:0]
    if lefts.max() > exact:
        near = lefts >= lefts.max() // 2
        far, far_at = lefts[~near], rows_at[~near]
        binned = np.round(np.exp(np.round(np.log(lefts[near]) * 100) / 100)).astype(int)
        lefts, where = np.unique(binned, return_inverse=True)
        rows_at = np.bincount(where, weights=rows_at[near])
    done, every = done_within(a, lefts, exact)  # [K + 1, U, N], n every `every` steps
    alive = ((1.0 - done) * rows_at[:, None]).sum(1)  # [K + 1, N] E[A_n]
    if len(far):  # rows with at most g n tokens to go are done by step n, g a step's mean tokens
        reached = (step_pmf(a) @ np.arange(k + 2.0) * every)[:, None] * np.arange(done.shape[2])  # [K + 1, N]
        below = np.concatenate([[0], np.cumsum(far_at)])  # rows with fewer tokens to go than far[i]
        alive += below[-1] - below[np.searchsorted(far, reached, side="right")]
    running = 1.0 - (done ** rows_at[:, None]).prod(1)  # [K + 1, N] P(A_n > 0)
    counts = row_counts(rows)
    grid = [chain_step(r, c, context if r == rows else max(context // rows, 1) * r) for c in range(k + 1)
            for r in counts]  # fmt: skip
    shapes = grid[len(counts) - 1 :: len(counts)]  # [K + 1] the whole batch's
    priced = step_time.predict([*grid, *lagging(shapes, catchup)])  # one call (numpy's overhead)
    cost = priced[: len(grid)].reshape(k + 1, len(counts))  # [K + 1, G]
    given = alive / np.maximum(running, 1e-300)  # [K + 1, N] E[A_n | A_n > 0]
    step = np.stack([np.interp(given[c], counts, cost[c]) for c in range(k + 1)])  # [K + 1, N]
    switch = switch_cost(step_time, shapes, cost[:, -1], catchup, priced[len(grid) :])
    return float(left.sum()) / np.maximum(every * (running * step).sum(1) + switch, 1e-6)


def row_counts(rows: int) -> np.ndarray:
    """The row counts at which `makespan_rates` prices a step: 1, 2, 3, then 50% apart up to
    `rows` (7 counts at 16 rows, 11 at 64), so that one row's cost stands apart from two's
    (an AMD EPYC's plain step: 102 ms at one row, 197 at two, 242 at eight)."""
    counts = [1]
    while counts[-1] < rows:
        counts.append(min(rows, max(counts[-1] + 1, math.ceil(counts[-1] * 1.5))))
    return np.array(counts)


def step_pmf(alpha: np.ndarray) -> np.ndarray:
    """[K + 1, K + 2]: the chance that a step drafting c gives x tokens (x = 1 .. c + 1)."""
    k = len(alpha)
    surv = np.concatenate([[1.0], np.cumprod(alpha)])  # [K + 1] P(A >= j), A = drafts accepted
    pmf = np.zeros((k + 1, k + 2))
    for c in range(k + 1):
        pmf[c, 1 : c + 1] = surv[:c] - surv[1 : c + 1]
        pmf[c, c + 1] = surv[c]
    return pmf


def done_within(alpha: np.ndarray, left: np.ndarray, exact: int = 64) -> tuple[np.ndarray, int]:
    """([K + 1, R, N], e): the chance that row i, with left[i] tokens to go, is done within n
    steps drafting c a step, n = 0, e, 2e, .. max(left): exact (e = 1; `done_exactly`) up to
    `exact` tokens, else the renewal process's normal approximation on at most 129 points."""
    m = int(left.max())
    if m <= exact:
        return done_exactly(alpha, left), 1
    k, pmf = len(alpha), step_pmf(alpha)  # [c, x] P(a step gives x tokens), drafting c
    mean = pmf @ np.arange(k + 2.0)  # [K + 1]
    sd = np.sqrt(np.maximum(pmf @ np.arange(k + 2.0) ** 2 - mean**2, 1e-12))
    every = max(1, m // 128)
    at = np.arange(0, m + 1, every)
    mu = left[None, :, None] / mean[:, None, None]  # [K + 1, R, 1]
    sigma = np.sqrt(left[None, :, None]) * sd[:, None, None] / mean[:, None, None] ** 1.5
    return ndtr((at[None, None, :] + 0.5 - mu) / sigma), every


def done_exactly(alpha: np.ndarray, left: np.ndarray) -> np.ndarray:
    """[K + 1, R, m + 1], m = max(left): [c, i, n] the chance that a row with left[i] tokens to
    go is done within n steps drafting c a step, P(S_n >= left[i]) where S_n is the tokens of n
    steps, each as `step_pmf` (a step that could give more than the row has left ends it all
    the same: the row is done by step n exactly when the unclipped sum has reached left[i]).

    S_n's distribution is the n-th power of a step's generating function: on 2m + 2 points of a
    circle of radius r < 1 (`_circle`), the step's transform, its powers for every n at once
    (one cumulative product), and each row's P(S_n < left[i]) as a sum over the circle against
    the transform of the indicator of s < left[i] (kept per m). The radius damps what wraps
    around from S_n >= 2m + 2 to r^(2m+2) = 1e-10 of itself and amplifies rounding by at most
    r^-m = 1e5: within 1e-9 of the recursion one step at a time, which took m numpy calls (0.37
    ms at 32 tokens on the 2-core Xeon, most of the run-end rule's 0.55-0.67 ms decision; this
    takes five: the whole decision 2-2.5x faster on an AMD EPYC, docs/issue30/drain/act_time.txt).
    No draft (c = 0): a token a step, exactly."""
    k, pmf = len(alpha), step_pmf(alpha)  # [c, x] P(a step gives x tokens), drafting c
    m = int(left.max())
    done = np.empty((k + 1, len(left), m + 1))
    n = np.arange(m + 1)
    done[0] = n[None, :] >= left[:, None]
    if k == 0:
        return done
    powers_of, below = _circle(m, k)
    step = pmf[1:] @ powers_of  # [c >= 1, W] the step's transform
    powers = np.empty((k, m + 1, step.shape[1]), dtype=np.complex128)
    powers[:, 0] = 1.0
    np.cumprod(np.broadcast_to(step[:, None, :], (k, m, step.shape[1])), axis=1, out=powers[:, 1:])
    short = (powers @ below[:, left]).real  # [c, n, R] P(S_n < left[i])
    done[1:] = np.clip(1.0 - short, 0.0, 1.0).transpose(0, 2, 1)
    return done


@functools.lru_cache(maxsize=128)  # at most 70 KB each at the 64 tokens `done_within` asks
def _circle(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`done_exactly`'s circle for m tokens and drafts up to k: ([K + 2, W] z_w^x, x = 0 .. K + 1;
    [W, m + 1] the weight of point w in P(S < j), j = 0 .. m), z_w = r exp(2 pi i w / (2m + 2)),
    w = 0 .. m + 1, r^(m+1) = 1e-5 (the other half of the circle is these points' conjugates:
    the sequences are real, so each inner point counts twice)."""
    size = 2 * m + 2
    z = 1e-5 ** (1.0 / (m + 1)) * np.exp(2j * np.pi * np.arange(m + 2) / size)  # [W]
    weight = np.full(m + 2, 2.0 / size)
    weight[0] = weight[-1] = 1.0 / size
    below = np.zeros((m + 2, m + 1), dtype=np.complex128)  # sum over s < j of z^-s
    below[:, 1:] = np.cumsum((1.0 / z)[:, None] ** np.arange(m)[None, :], axis=1)
    return z[None, :] ** np.arange(k + 2.0)[:, None], below * weight[:, None]


def goodput_length(step_time: StepTimePredictor, alpha: torch.Tensor, rows: int, context: int, prefill: int = 0,
                   margin: float = 0.03) -> int:  # fmt: skip
    """c* = argmax_c rows * tokens(c) / T(c), a longer draft taken only where it beats every
    shorter one by `margin` (the rule above; `adactl export` evaluates it over batch sizes)."""
    return shortest_within(goodput_rates(step_time, alpha, rows, context, prefill), margin)


def shortest_within(rate: np.ndarray, margin: float) -> int:
    """The index of the best rate, except that a later (longer) candidate is taken only where
    it beats the best earlier one by more than `margin`."""
    best = 0
    for c in range(1, len(rate)):
        if rate[c] > rate[best] * (1 + margin):
            best = c
    return best
