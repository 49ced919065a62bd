"""What the learned controllers read and how their actions act, next to `LearnedController`.

The environments (`adactl.envs`, which sit above the controllers) and `LearnedController`
share these, so a policy sees the same features and its actions mean the same thing in
training and in deployment:
- `SpecFeatures`, `StreamFeatures`: each is called with a `ScheduleState` and returns a
  float32 vector in [0, 1]; `update(record)` feeds it the step's outcome;
- the per-row `SpecDecode-v0` action (`row_lengths`, `ROW_TAUS`) and `RowFeatures`, which add
  each running request's own acceptance estimate to `SpecFeatures`;
- the `Streaming-v0` action space (`RISK_TARGETS`, `DEFER_STEPS`, `MAX_IN_FLIGHT`) and
  `apply_action`, which sets ProgressServe's knobs from an action.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from adactl.estimators.step_time import StepShape
from adactl.interface import ScheduleState, StepRecord
from adactl.runtime.shapes import context_of

from .progressserve import ProgressServe

RISK_TARGETS = (0.001, 0.005, 0.02, 0.1, 0.999)
DEFER_STEPS = (None, 0, 1, 2, 4)  # None: run every admitted request every step (no deferral)
MAX_IN_FLIGHT = (8, 12, 16, 24, None)  # vLLM's max_num_seqs; None: no cap
DEFAULT_ACTION = (1, 3, 4)  # ProgressServe's defaults: 0.5% risk, 2 steps, no cap


def apply_action(ps: ProgressServe, action: Any) -> None:
    """Set ProgressServe's knobs from a `Streaming-v0` action."""
    ps.target = RISK_TARGETS[int(action[0])]
    ps.defer_steps = DEFER_STEPS[int(action[1])]
    ps.max_num_seqs = MAX_IN_FLIGHT[int(action[2])]


def _clip(features: list[float]) -> np.ndarray:
    return np.clip(np.nan_to_num(np.asarray(features, dtype=np.float32), nan=0.0), 0.0, 1.0)


class SpecFeatures:
    """For the draft-length decision: running requests (linear and log scale), waiting prompt
    tokens, mean context, predicted plain step time, the acceptance estimate by position
    (per-position moving average), the predicted step time of each draft length relative to
    plain decoding, and the recent mean accepted length."""

    def __init__(self, max_draft_len: int, step_time: Any, estimator: Any = None) -> None:
        from adactl.estimators import MovingAverage

        self.max_draft_len, self.step_time = max_draft_len, step_time
        self.estimator = estimator if estimator is not None else MovingAverage()
        self.accepted_ema = 0.0

    @property
    def size(self) -> int:
        return 5 + self.max_draft_len + (self.max_draft_len + 1) + 1

    def shape(self, state: ScheduleState, k: int) -> StepShape:
        running = state.running
        rows = len(running)
        prefill = state.prefill_tokens
        context, span = context_of([v.context_len for v in running])
        return StepShape(rows, rows * (k + 1), k + 1 if rows else 0, rows * k, k if rows else 0, prefill, context,
                         span_tokens=span)  # fmt: skip

    def __call__(self, state: ScheduleState) -> np.ndarray:
        running = state.running
        rows, k = len(running), self.max_draft_len
        alpha = self.estimator.alpha(k).clamp(0, 1).tolist()
        seconds = np.maximum(self.step_time.predict([self.shape(state, c) for c in range(k + 1)]), 1e-6)
        waiting = sum(v.prompt_len - v.prefilled for v in state.waiting)
        context = float(np.mean([v.context_len for v in running])) if running else 0.0
        return _clip([
            rows / 64.0,
            math.log2(rows + 1) / math.log2(65),
            waiting / 2048.0,
            context / 2048.0,
            float(seconds[0]) / 0.5,
            *alpha,
            *(seconds / seconds[0] / 4.0).tolist(),
            self.accepted_ema / k,
        ])  # fmt: skip

    def update(self, record: StepRecord) -> None:
        self.estimator.update(record)
        accepted = record.outcome.accepted
        if len(accepted):
            self.accepted_ema = 0.8 * self.accepted_ema + 0.2 * float(accepted.float().mean())


# per-row SpecDecode-v0 actions: 0 is plain decoding; a >= 1 is a cap c and a threshold tau,
# and row i drafts min(c, its room, the positions j whose estimated survival s_ij = prod_{l <= j}
# alpha_il clears tau): the threshold-and-cap candidates of `sv.prefix_candidates`, on a grid.
# tau = 0 is every row at c (the batch-wide action), so the batch policy's choices are among them.
ROW_TAUS = (0.0, 0.15, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85)


def row_actions(max_draft_len: int) -> int:
    """How many per-row actions there are for drafts of at most `max_draft_len`."""
    return 1 + max_draft_len * len(ROW_TAUS)


def row_lengths(survival: Any, room: Any, action: int) -> Any:
    """[R] draft lengths of per-row action `action` (see `ROW_TAUS`) for rows of estimated
    survival [R, K] and room [R] (tokens each row may still generate after this step's)."""
    k = survival.shape[1]
    if not 0 <= action < row_actions(k):
        raise ValueError(f"a per-row action is in 0..{row_actions(k) - 1}, got {action}")
    if action == 0 or survival.shape[0] == 0:
        return torch.zeros(survival.shape[0], dtype=torch.long)
    cap, tau = 1 + (action - 1) // len(ROW_TAUS), ROW_TAUS[(action - 1) % len(ROW_TAUS)]
    above = ((survival >= tau) * torch.arange(1, k + 1)).amax(1)  # survival falls along a chain
    return torch.minimum(torch.minimum(above, room), torch.tensor(cap)).long()


class RowFeatures(SpecFeatures):
    """`SpecFeatures` for per-row actions: each running request's own acceptance estimate
    (`RequestAcceptance`, learned alongside the batch's moving average) summarised per
    threshold of `ROW_TAUS`: the mean length rows would draft at it (uncapped) and the mean
    tokens they would be expected to add, and the share of greedy rows."""

    def __init__(self, max_draft_len: int, step_time: Any, estimator: Any = None) -> None:
        from adactl.estimators.request_acceptance import RequestAcceptance

        super().__init__(max_draft_len, step_time, estimator)
        self.rows = RequestAcceptance(self.estimator if hasattr(self.estimator, "mean") else None)

    @property
    def size(self) -> int:
        return super().size + 2 * len(ROW_TAUS) + 1

    def survival(self, state: ScheduleState) -> Any:
        """[R, K] each running request's estimated survival by draft position."""
        running = state.running
        greedy = [v.sampling.temperature <= 0 for v in running]
        alpha = self.rows.alpha_of([v.request_id for v in running], greedy, self.max_draft_len)
        return torch.cumprod(alpha.float(), 1)

    def room(self, state: ScheduleState) -> Any:
        return torch.tensor([min(self.max_draft_len, v.draft_room) for v in state.running], dtype=torch.long)

    def lengths(self, state: ScheduleState, action: int) -> Any:
        """[R] the draft length of each running request under per-row `action`."""
        return row_lengths(self.survival(state), self.room(state), action)

    def __call__(self, state: ScheduleState) -> np.ndarray:
        base = super().__call__(state)
        s, k = self.survival(state), self.max_draft_len
        extra = [0.0] * (2 * len(ROW_TAUS) + 1)
        if len(s):
            extra = []
            for tau in ROW_TAUS:
                chosen = s >= tau
                extra += [float(chosen.sum(1).float().mean()) / k, float((s * chosen).sum(1).mean()) / k]
            extra.append(float(np.mean([v.sampling.temperature <= 0 for v in state.running])))
        return np.concatenate([base, _clip(extra)])

    def update(self, record: StepRecord) -> None:
        super().update(record)
        self.rows.update(record)


class StreamFeatures:
    """For the streaming schedule: in flight, waiting, running, arrivals per second over the
    last 5 s, least and mean slack of the running readers, the share of them with under half
    a second of slack, the oldest waiting request's share of its TTFT, predicted step time,
    and the recent miss rate (misses per unit read, an exponential average over steps)."""

    size = 10

    def __init__(self, step_time: Any) -> None:
        self.step_time = step_time
        self.arrivals: dict[str, float] = {}
        self.seen: dict[str, tuple[int, int]] = {}
        self.miss_ema = 0.0

    def __call__(self, state: ScheduleState) -> np.ndarray:
        from adactl.controllers.stream_common import decode_seconds, first_token_deadline, in_flight, slack

        now = state.now
        read = missed = 0
        for v in state.requests:
            self.arrivals.setdefault(v.request_id, v.arrival_time)
            p = v.stream_progress
            if p is not None:
                before = self.seen.get(v.request_id, (0, 0))
                read, missed = read + p.units_read - before[0], missed + p.misses - before[1]
                self.seen[v.request_id] = (p.units_read, p.misses)
        if read or missed:
            self.miss_ema = 0.95 * self.miss_ema + 0.05 * missed / max(read, missed, 1)
        horizon = now - 5.0
        self.arrivals = {r: t for r, t in self.arrivals.items() if t > horizon - 60.0}  # bounded memory
        recent = sum(t > horizon for t in self.arrivals.values()) / 5.0
        running = [v for v in state.running if v.stream is not None]
        slacks = [slack(v, now) for v in running]
        waiting = state.waiting
        oldest = max(
            ((now - v.arrival_time) / max(first_token_deadline(v) - v.arrival_time, 1e-6) for v in waiting), default=0.0
        )
        step_s = decode_seconds(self.step_time, [len(state.running)], [v.context_len for v in state.running])[0]
        return _clip([
            in_flight(state) / 32.0,
            len(waiting) / 16.0,
            len(state.running) / 32.0,
            recent / 8.0,
            (min(slacks, default=4.0) + 1.0) / 5.0,
            (float(np.mean(slacks)) if slacks else 4.0) / 8.0,
            sum(s < 0.5 for s in slacks) / max(len(slacks), 1),
            oldest / 2.0,
            step_s / 0.5,
            self.miss_ema * 10.0,
        ])  # fmt: skip

    def update(self, record: StepRecord) -> None:
        live = {v.request_id for v in record.schedule.requests}
        self.seen = {r: c for r, c in self.seen.items() if r in live}
