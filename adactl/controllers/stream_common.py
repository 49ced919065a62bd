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
    rows are the first n of `context` (their contexts: summed, and the longest spans them all)."""
    c = torch.tensor(list(context), dtype=torch.long)
    total, longest = [0, *c.cumsum(0).tolist()], [0, *c.cummax(0).values.tolist()]
    shapes = [StepShape(n, n, 1 if n else 0, 0, 0, prefill, int(total[m]), span_tokens=n * int(longest[m]))
              for n in rows for m in [min(n, len(context))]]  # fmt: skip
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


def moved_off(view: RequestView) -> bool:
    """A stream moved off the device: offloaded, restoring, or preempted after it had started
    (waiting with output, to be prefilled again)."""
    return view.stream is not None and (view.status in ("offloaded", "restoring")
                                        or (view.status == "waiting" and view.num_generated > 0))  # fmt: skip


class MemoryLever:
    """One step's KV bookkeeping for the memory lever of ProgressServe and TokenFlow-like
    schedulers (ProgressServe's docstring has the rule): which streams go off the device to
    admit a request, which come back. `step_time` prices a recompute where the server has no
    host memory, and the longest step to expect (the batch beside a `prefill_budget` chunk);
    `lead`: seconds of slack kept beyond the way back and two such steps (the one in flight when
    a stream is back, and its own), so that a server whose steps are long (a CPU, or a GPU's
    long prefill chunks) does not bring streams back too late."""

    def __init__(self, step_time: StepTimePredictor, state: ScheduleState, lead: float = 1.0,
                 prefill_budget: int = 0) -> None:  # fmt: skip
        assert state.kv is not None
        self.step_time, self.kv, self.now = step_time, state.kv, state.now
        context = [v.context_len for v in state.running]
        step_s = decode_seconds(step_time, [len(context)], context, prefill_budget)[0] if prefill_budget else 0.0
        self.lead = lead + 2 * step_s
        self.free = state.kv.free_blocks - len(state.running)  # one block per running row kept for growth
        # prompts part-way through prefill take their remaining blocks in the coming steps: kept for
        # them (a stream restored into them would stall their next chunk; found in the long workload)
        self.free -= sum(self.need(v) for v in state.waiting if v.status == "prefilling")
        self.offloading = state.kv.host_free_tokens is not None
        self.host = state.kv.host_free_tokens or 0
        running = [v for v in state.running if v.stream is not None]
        self.away = sorted((v for v in state.waiting if moved_off(v) and v.status != "restoring"),
                           key=lambda v: slack(v, self.now))  # fmt: skip
        # victims: largest slack first, among those whose slack covers the way back with room to spare
        self.victims = sorted((v for v in running if slack(v, self.now) > self.back_cost(v) + self.lead + lead),
                              key=lambda v: slack(v, self.now), reverse=True)  # fmt: skip
        self.taken: list[str] = []
        # streams whose buffers are nearly read come back before anything is admitted (else a
        # stream off the device could wait as long as newcomers keep coming)
        self.back: dict[str, list[str]] = {"restore": [], "readmit": []}
        for v in list(self.away):
            blocks = self.kv.blocks_for(v.context_len + 1)
            if slack(v, self.now) <= self.back_cost(v) + self.lead and blocks <= self.free:
                self.back["restore" if v.status == "offloaded" else "readmit"].append(v.request_id)
                self.free -= blocks
                self.away.remove(v)

    def back_cost(self, view: RequestView) -> float:
        """Seconds to bring `view` back on the device: its KV copied from host memory, or (no
        host memory) its whole context prefilled again."""
        if self.offloading:
            return view.context_len * self.kv.copy_s_per_token
        return float(self.step_time.predict([StepShape(0, 0, 0, 0, 0, view.context_len, 0)])[0])

    def need(self, view: RequestView) -> int:
        """Blocks a waiting request takes once admitted: its whole prompt (vLLM v1 admits a
        request only when its current sequence fits)."""
        return self.kv.blocks_for(view.prompt_len + 1) - self.kv.blocks_for(view.prefilled)

    def make_room(self, view: RequestView) -> bool:
        """Blocks for `view`, moving victims off the device if needed; False (nothing moved) if
        even every victim would not free enough."""
        need = self.need(view)
        plan, free, host = [], self.free, self.host
        for v in self.victims:
            if free >= need:
                break
            if self.offloading and v.context_len > host:
                continue
            plan.append(v)
            free += self.kv.blocks_for(v.context_len + 1)
            host -= v.context_len if self.offloading else 0
        if free < need:
            return False
        self.victims = [v for v in self.victims if v not in plan]
        self.taken += [v.request_id for v in plan]
        self.free, self.host = free - need, host
        return True

    def moves(self, waiting_blocks: int) -> dict[str, list[str]]:
        """The step's preempt / offload / restore lists and `readmit` (preempted streams to
        prefill again): the victims taken for admissions, and the streams brought back
        (slack-critical first, then any while memory stays free beyond `waiting_blocks`, what
        the queue still needs)."""
        back = {key: list(ids) for key, ids in self.back.items()}  # the slack-critical, taken first
        for v in self.away:
            blocks = self.kv.blocks_for(v.context_len + 1)
            if blocks <= self.free - waiting_blocks:
                back["restore" if v.status == "offloaded" else "readmit"].append(v.request_id)
                self.free -= blocks
        key = "offload" if self.offloading else "preempt"
        return {"preempt": [], "offload": [], **back, key: list(self.taken)}
