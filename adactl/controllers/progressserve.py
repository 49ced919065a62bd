"""ProgressServe: run the requests at risk, defer those with safe buffers, admit only what stays safe.

Each step, with a deadline-risk model R (P(some unit due within the horizon misses); see
`adactl.estimators.deadline_risk`), the step-time model T(n) for n decode rows, and the
running streamed requests in slack order (seconds until each reader runs dry):

    at risk = {i : R_i(deferred d steps, then run in the full batch at T(all)) >= target}
    run     = the least-slack requests up to the last one at risk, then more in slack order
              while T(n) <= min over the at-risk i of 1 / rate_i (a step no longer than the
              fastest at-risk reader's period); everyone when nobody is at risk (work
              conserving: buffers grow while it is cheap). The rest are deferred and keep
              their KV cache (deferral is not recomputation). defer_steps=None: never
              defer (admission control only).
    admit   = waiting requests in deadline order while this step's prefill budget has room (as
              vLLM's token budget: the last one admitted may start chunked), each only if the
              load stays servable:
              with D = the readers' total demand (tokens/s), the rows per step it takes,
              F = D * T(F) (a fixed point), exist and fit (F <= in-flight), and every reader,
              served at the mean step time T(F), has R_i < target (a stalled reader counted
              from its resumption: at least one unit of buffer). Otherwise it waits, and
              `reasons` says why; except when nothing is in flight: the head of the queue is
              then admitted whatever its risk (best effort), since waiting can only make it
              later, and a reader the machine cannot keep up with even alone would otherwise
              wait forever (found in the replay: an idle server held one for 42,000 s).

Where the server reports its KV memory (`ScheduleState.kv`, a pool of blocks: the replay's
and the engine's, DESIGN.md section 10), memory is a lever too (`memory=True`), as in
TokenFlow and Andes, with margin = `lead` + two of the longest steps to expect (the batch
beside a full prefill chunk: the step in flight when a stream is back, and its own):

    victims  = running streams whose slack exceeds the cost of bringing them back (the KV
               copy from host memory, or the recompute prefill where the server has no host
               memory) plus margin + lead seconds, largest slack first
    offload  = victims (or preempt them), while a request admission would take cannot get its
               blocks (its prompt, plus one block per running row kept free for growth)
    restore  = offloaded streams whose slack is down to their copy time plus margin, in slack
               order, while their blocks are free; and any offloaded request while the blocks
               stay free beyond what waiting requests need (buffers grow while memory is free)

Offloaded streams count in the readers' demand that admission tests: they are in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from adactl.estimators.deadline_risk import AnalyticRisk
from adactl.estimators.step_time import StepTimePredictor
from adactl.interface import Controller, ScheduleState
from adactl.runtime.types import RequestView, StepPlan

from .stream_common import MemoryLever, decode_seconds, first_unit_deadline, moved_off, slack, stream_state


class ProgressServe(Controller):
    name = "progressserve"

    def __init__(self, step_time: StepTimePredictor, risk: Any = None, target: float = 0.005,
                 defer_steps: int | None = 2,
                 max_num_seqs: int | None = None, prefill_budget: int = 512, admit_per_step: int | None = None,
                 horizon: float = 2.0, memory: bool = True, lead: float = 1.0) -> None:  # fmt: skip
        if not 0 < target < 1:
            raise ValueError(f"target must be in (0, 1), got {target}")
        self.step_time = step_time
        self.risk = risk if risk is not None else AnalyticRisk()
        self.target, self.defer_steps, self.horizon = target, defer_steps, horizon
        self.max_num_seqs, self.prefill_budget, self.admit_per_step = max_num_seqs, prefill_budget, admit_per_step
        self.memory, self.lead = memory, lead
        self.reasons: dict[str, str] = {}  # waiting request -> why it was not admitted (last step)

    def _seconds(self, rows: Sequence[int], context: Sequence[int], prefill: int) -> list[float]:
        return decode_seconds(self.step_time, rows, context, prefill)

    def choose(self, streamed: Sequence[RequestView], others: int, context: Sequence[int], now: float,
               prefill: int) -> int:  # fmt: skip
        """How many of `streamed` (in slack order) run this step, next to `others` plain rows."""
        r = len(streamed)
        if r == 0 or self.defer_steps is None:  # None: never defer (admission control only)
            return r
        seconds = self._seconds([others + m for m in range(r + 1)], context, prefill)  # [R + 1]
        deferred = stream_state(streamed, now, seconds[r], defer_steps=float(self.defer_steps), horizon=self.horizon)
        at_risk = (self.risk.estimate(deferred) >= self.target).nonzero()
        if len(at_risk) == 0:
            return r
        last = int(at_risk.max()) + 1
        cap = float(1.0 / deferred.rate[at_risk[:, 0]].max())  # the fastest at-risk reader's period
        fits = [m for m in range(last, r + 1) if seconds[m] <= cap]
        return max(fits) if fits else last

    def servable(self, streamed: Sequence[RequestView], others: int, context: Sequence[int], now: float,
                 prefill: int) -> tuple[bool, str]:  # fmt: skip
        """Whether the readers' demand fits (see the module docstring), and if not why."""
        if not streamed:
            return True, ""
        demand = float(stream_state(streamed, now, 1.0).rate.sum())  # tokens/s
        rows = float(len(streamed))
        for _ in range(30):  # F = D * T(F); converges when the demand fits, grows past R if not
            step = self._seconds([others + max(1, round(rows))], context, prefill)[0]
            new = demand * step
            if abs(new - rows) < 0.05 or new > 4 * len(streamed):
                rows = new
                break
            rows = new
        if rows > len(streamed):
            return False, f"the readers' demand ({demand:.0f} tokens/s) exceeds what the batch can generate"
        step = self._seconds([others + max(1, round(rows))], context, prefill)[0]
        served = stream_state(streamed, now, step, horizon=self.horizon)
        # a stalled (or late-starting) reader resumes when its late unit arrives, the next one
        # due a period later: what matters is whether it keeps up from there, so count at least
        # one unit of buffer
        served = replace(served, buffer=torch.maximum(served.buffer, served.unit))
        risk = self.risk.estimate(served)
        worst = float(risk.max())
        if worst >= self.target:
            return False, f"admitting it puts an in-flight stream at {worst:.1%} miss risk"
        return True, ""

    def _within_budgets(self, candidates: list[RequestView], prefill: int, in_flight: int,
                        max_batch: int | None) -> list[RequestView]:  # fmt: skip
        """The longest prefix of `candidates` this step's budgets admit (prefill tokens, the
        optional admissions per step, `max_num_seqs`, the server's free rows); `reasons` says
        why the rest wait. A request admitted without a free row would not start, yet its
        prompt would count in the step's predicted prefill: found in the chat replay at 256
        rows, where that phantom prefill made the steps look too slow for the readers and
        ProgressServe deferred most of a full batch (45 of 256 rows run, the capacity halved)."""
        admitted = 0
        for i, v in enumerate(candidates):
            why = ""
            if prefill >= self.prefill_budget:  # as vLLM's token budget: no prefill could start this step
                why = "this step's prefill budget is spent"
            elif self.admit_per_step is not None and admitted >= self.admit_per_step:
                why = "admission limit this step"
            elif self.max_num_seqs is not None and in_flight + admitted >= self.max_num_seqs:
                why = "max_num_seqs in flight"
            elif max_batch is not None and in_flight + admitted >= max_batch:
                why = "no free row in the server's batch"
            if why:
                self.reasons.update({w.request_id: why for w in candidates[i:]})
                return candidates[:i]
            admitted += 1
            prefill = min(self.prefill_budget, prefill + v.prompt_len)
        return candidates

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        now = state.now
        running = state.running
        streamed = sorted((v for v in running if v.stream is not None), key=lambda v: slack(v, now))
        plain = [v for v in running if v.stream is None]
        lever = self.memory and state.kv is not None
        # moved off the device: the lever brings them back; without it they queue as any other (a
        # server's own preemption moves them too)
        away = [v for v in state.waiting if moved_off(v) and (lever or v.status == "restoring")]
        waiting = sorted((v for v in state.waiting if v not in away), key=first_unit_deadline)
        prefilling = [v.request_id for v in waiting if v.status == "prefilling"]
        pending = sum(v.prompt_len - v.prefilled for v in waiting if v.status == "prefilling")
        prefill = min(self.prefill_budget, pending)
        in_flight = len(running) + len(prefilling)
        admit = list(prefilling)
        self.reasons = {}
        candidates = [v for v in waiting if v.status != "prefilling"]
        joining: list[RequestView] = [v for v in waiting if v.status == "prefilling" and v.stream is not None]
        joining += away  # in flight, off the device: their readers' demand counts
        memory = MemoryLever(self.step_time, state, self.lead, self.prefill_budget) if lever else None
        # the admitted set is a prefix of `candidates` (the first refusal blocks the line): the
        # budgets give its longest form, the servability test a shorter one, found by bisection
        # (the test adds demand with each stream, so it holds for a prefix if for a longer one):
        # a test per candidate costs O(admitted x in flight) a step, seconds with a GPU's 1,000
        # rows (found in the chat replay at 150 requests/s)
        eligible = self._within_budgets(candidates, prefill, in_flight, state.max_batch)
        streams = [v for v in eligible if v.stream is not None]

        def test(k: int) -> tuple[bool, str]:
            trial = [*streamed, *joining, *streams[:k]]
            return self.servable(trial, len(plain), [x.context_len for x in [*plain, *trial]], now, 0)

        every, why = test(len(streams)) if streams else (True, "")
        if not every:
            lo, hi = 0, len(streams)  # test(lo) holds (none added), test(hi) does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                ok, reason = test(mid)
                lo, hi, why = (mid, hi, why) if ok else (lo, mid, reason)
            if lo == 0 and in_flight == 0 and eligible[0] is streams[0]:  # nothing to protect: serve it
                self.reasons[streams[0].request_id] = f"admitted with nothing in flight, although {why}"
                lo = 1  # (the next stream would join a reader the machine cannot keep up with)
            if lo < len(streams):
                self.reasons[streams[lo].request_id] = why
                eligible = eligible[: eligible.index(streams[lo])]
        for i, v in enumerate(eligible):
            if memory is not None and not memory.make_room(v):
                self.reasons[v.request_id] = "no KV blocks free, and no stream has the slack to be moved off"
                self.reasons.update({w.request_id: "queued behind an earlier request" for w in candidates[i + 1 :]})
                eligible = eligible[:i]
                break
        admit += [v.request_id for v in eligible]
        prefill = min(self.prefill_budget, prefill + sum(v.prompt_len for v in eligible))
        for v in candidates[len(eligible) :]:
            self.reasons.setdefault(v.request_id, "queued behind an earlier request")
        moves: dict[str, list[str]] = {}
        if memory is not None:
            moves = memory.moves(waiting_blocks=sum(memory.need(v) for v in candidates if v.request_id not in admit))
            back = moves.pop("readmit")
            admit = [*back, *admit]  # recomputed ones come back first (their prefill is their restore)
            prefill = min(self.prefill_budget, prefill + sum(v.context_len for v in away if v.request_id in back))
            gone = {*moves["preempt"], *moves["offload"]}
            streamed = [v for v in streamed if v.request_id not in gone]
            plain = [v for v in plain if v.request_id not in gone]
        m = self.choose(streamed, len(plain), [x.context_len for x in [*plain, *streamed]], now, prefill)
        run = [v.request_id for v in plain] + [v.request_id for v in streamed[:m]]
        return replace(state.plan, admit=admit, run=run, prefill_budget=self.prefill_budget, **moves)
