"""What the streaming schedule controllers share: deadlines, slack and deadline-risk inputs,
and `PriorityScheduler`, the admit-in-order, run-by-priority rule of EDF and Andes.

Every quantity comes from `RequestView` (its `stream` and `stream_progress`), so the
controllers run on any server that fills those in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from adactl.estimators.deadline_risk import StreamState
from adactl.estimators.step_time import StepShape, StepTimePredictor
from adactl.interface import Controller, ScheduleState
from adactl.runtime.types import RequestView, StepPlan


def first_unit_deadline(view: RequestView) -> float:
    """When the request's first unit is due (`Stream.first_unit_s`; without a stream, its TTFT
    SLO; inf without either)."""
    if view.stream is not None:
        return view.arrival_time + view.stream.first_unit_s
    if view.slo is not None and view.slo.ttft_s is not None:
        return view.arrival_time + view.slo.ttft_s
    return float("inf")


def first_token_deadline(view: RequestView) -> float:
    """When the request's first token is due: its TTFT target (inf without one)."""
    if view.stream is not None:
        return view.arrival_time + view.stream.ttft_s
    if view.slo is not None and view.slo.ttft_s is not None:
        return view.arrival_time + view.slo.ttft_s
    return float("inf")


def slack(view: RequestView, now: float) -> float:
    """Seconds until the request's consumer runs out of ready output (inf: no stream)."""
    p = view.stream_progress
    if p is None:
        return float("inf") if view.stream is None else first_unit_deadline(view) - now
    return p.slack(now)


def lag(view: RequestView, now: float) -> float:
    """Andes' priority: units the consumer expected by now (from the first-unit deadline on,
    at its rate) minus units generated; > 0 means delivery lags the consumer's timeline."""
    if view.stream is None:
        return float("-inf")
    expected = max(0.0, now - first_unit_deadline(view)) * view.stream.rate + 1
    ready = view.stream_progress.units_ready if view.stream_progress is not None else 0
    return expected - ready


STARTED = ("prefilling", "offloaded")  # admitted before, not running now: admitted again first


def in_flight(state: ScheduleState) -> int:
    """Admitted requests on the device: running, prefilling, or restoring."""
    return len(state.running) + sum(v.status in ("prefilling", "restoring") for v in state.waiting)


def admit_in_order(waiting: Sequence[RequestView], in_flight: int, max_num_seqs: int | None) -> list[str]:
    """Waiting requests in arrival order while in-flight requests stay within `max_num_seqs`
    (requests already prefilling stay admitted; offloaded ones come back first, as vLLM's
    preempted requests go back to the head of its queue; a restore in flight joins by itself)."""
    order = sorted((v for v in waiting if v.status != "restoring"), key=lambda v: (v.status not in STARTED,
                                                                                  v.arrival_time))  # fmt: skip
    room = len(order) if max_num_seqs is None else max(0, max_num_seqs - in_flight)
    started = [v.request_id for v in order if v.status == "prefilling"]
    back = [v.request_id for v in order if v.status == "offloaded"]
    fresh = [v.request_id for v in order if v.status not in STARTED]
    return started + (back + fresh)[: max(0, room - len(started))]


def decode_seconds(step_time: StepTimePredictor, rows: Sequence[int], context: Sequence[int],
                   prefill: int = 0) -> list[float]:  # fmt: skip
    """Predicted seconds of a plain-decoding step with each number of rows in `rows`; the
    rows' context is the sum of the first n of `context`."""
    total = [0, *torch.tensor(list(context), dtype=torch.long).cumsum(0).tolist()]
    shapes = [StepShape(n, n, 1 if n else 0, 0, 0, prefill, int(total[min(n, len(context))])) for n in rows]
    return [float(x) for x in step_time.predict(shapes)]


def stream_state(views: Sequence[RequestView], now: float, step_s: float, tokens_per_step: float = 1.0,
                 defer_steps: float | torch.Tensor = 0.0, horizon: float = 2.0) -> StreamState:  # fmt: skip
    """Deadline-risk inputs, in tokens, for streamed requests: the buffer counts ready units
    plus the time left until the next one is due."""
    buffer, rate, unit = [], [], []
    for v in views:
        assert v.stream is not None
        p = v.stream_progress
        per_unit = p.tokens_per_unit if p is not None else 1.0
        if p is not None:
            units = p.buffer + (p.next_due - now) * p.rate
        else:
            units = (first_unit_deadline(v) - now) * v.stream.rate
        buffer.append(units * per_unit)
        rate.append(v.stream.rate * per_unit)
        unit.append(per_unit)
    n = len(views)
    return StreamState(
        buffer=torch.tensor(buffer, dtype=torch.float32),
        rate=torch.tensor(rate, dtype=torch.float32),
        step_time=torch.full((n,), step_s),
        tokens_per_step=torch.full((n,), tokens_per_step),
        tokens_std=0.5 if tokens_per_step > 1 else 0.05,
        unit=torch.tensor(unit, dtype=torch.float32),
        defer_steps=defer_steps,
        horizon=horizon,
    )


class PriorityScheduler(Controller):
    """Admit waiting requests (in the order `admit_key` gives, arrival order by default) while
    in flight <= max_num_seqs, and run the max_running running requests first in the order
    `run_key` gives (all of them when max_running is None), with a static prefill budget."""

    label = "priority"

    def __init__(self, max_running: int | None = None, max_num_seqs: int | None = None,
                 prefill_budget: int = 512) -> None:  # fmt: skip
        self.max_running, self.max_num_seqs, self.prefill_budget = max_running, max_num_seqs, prefill_budget

    @property
    def name(self) -> str:
        return f"{self.label}(run={self.max_running},seqs={self.max_num_seqs})"

    def admit_key(self, view: RequestView) -> float:
        return 0.0  # a stable sort: arrival order

    def run_key(self, view: RequestView, now: float) -> float:
        raise NotImplementedError

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        waiting = {v.request_id: v for v in state.waiting}
        admit = admit_in_order(state.waiting, in_flight(state), self.max_num_seqs)
        admit = sorted(admit, key=lambda rid: self.admit_key(waiting[rid]))
        running = sorted(state.running, key=lambda v: self.run_key(v, state.now))
        run = [v.request_id for v in running[: self.max_running]] if self.max_running is not None else None
        return replace(state.plan, admit=admit, run=run, prefill_budget=self.prefill_budget)
