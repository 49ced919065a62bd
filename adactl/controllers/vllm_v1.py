"""`vllm-v1`: vLLM v1's scheduler as it is, the baseline memory-aware schedulers are measured against.

What `vllm/v1/core/sched/scheduler.py` and `kv_cache_manager.py` do each step, on the blocks
the server reports (`ScheduleState.kv`):

    budget   = max_num_batched_tokens, shared by decode and prefill tokens
    running  = in admission order, each takes its next token from the budget and the blocks
               it needs to grow; where the blocks are missing, the last-admitted running
               request is preempted (recompute: its KV dropped, put first in the waiting
               queue, its prompt and output prefilled again when it comes back, emitting
               nothing until then) until they are not, or the request itself was the victim
    waiting  = only in a step that preempted nothing: in queue order (preempted ones first,
               then arrival), while in flight < max_num_seqs and the budget lasts, each
               admitted only if the blocks for its whole current sequence are free (the
               default since March 2026); the first that does not fit stops the queue (`break`:
               head-of-line), as does an empty budget
    prefill  = what the budget has left after the decodes (chunked prefill)

`priority=True` is vLLM's priority policy (`--scheduling-policy priority`): the waiting queue in
order of (priority, arrival time), preempted requests back in it by the same key, and the victim
the running request with the largest (priority, arrival time), even one scheduled earlier in the
step (its token and blocks come back). A request's priority is `SLO.priority` (lower first, 0
without an SLO), as vLLM's request `priority`. One difference from vLLM under either policy: a
prompt part-way through its prefill is never the victim (the server's moves act on running
requests); where its own next chunk's blocks are missing, the chunk waits a step instead.

`offload=True` swaps instead of recomputing (vLLM v0's swap space, `StepPlan.offload`): a victim's
KV goes to host memory while it has room, and comes back (`restore`) first in line when its
blocks are free. KV is freed at finish by the server. Without a KV report (a server that has no
pool) it is FCFS with the two caps.

Defaults are vLLM's for its OpenAI server on a GPU with at least 70 GiB that is not an A100
(H100, H200): `max_num_batched_tokens` 8192, `max_num_seqs` 1024; other GPUs 2048 and 256
(`vllm/engine/arg_utils.py`, `EngineArgs.get_batch_defaults`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from adactl.interface import Controller, ScheduleState
from adactl.runtime.types import KVState, RequestView, StepPlan

H100_DEFAULTS = (1024, 8192)  # (max_num_seqs, max_num_batched_tokens), vLLM's OpenAI server on >= 70 GiB
SMALL_GPU_DEFAULTS = (256, 2048)  # the same elsewhere (A100, smaller cards)


class VLLMv1(Controller):
    def __init__(self, max_num_seqs: int = H100_DEFAULTS[0], max_num_batched_tokens: int = H100_DEFAULTS[1],
                 offload: bool = False, priority: bool = False) -> None:  # fmt: skip
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs}, "
                             f"{max_num_batched_tokens}")  # fmt: skip
        self.max_num_seqs, self.max_num_batched_tokens, self.offload = max_num_seqs, max_num_batched_tokens, offload
        self.priority = priority
        self.order: dict[str, int] = {}  # request id -> when it was (last) admitted: vLLM's running list order
        self._admitted = 0
        self.preemptions = 0

    @property
    def name(self) -> str:
        swap = ",offload" if self.offload else ""
        policy = ",priority" if self.priority else ""
        return f"vllm-v1(seqs={self.max_num_seqs},tokens={self.max_num_batched_tokens}{swap}{policy})"

    def _rank(self, view: RequestView) -> int:
        if view.request_id not in self.order:  # running before we saw it admitted (e.g. the first step)
            self.order[view.request_id] = self._admitted
            self._admitted += 1
        return self.order[view.request_id]

    @staticmethod
    def _key(view: RequestView) -> tuple[int, float]:
        """The priority policy's order: (priority, arrival time), the smallest first."""
        return (view.slo.priority if view.slo is not None else 0, view.arrival_time)

    def _order(self, view: RequestView) -> tuple[int, float]:
        """Which request yields first, the largest: the last admitted (FCFS), or the largest key."""
        return self._key(view) if self.priority else (0, float(self._rank(view)))

    def _victim(self, current: RequestView, queue: list[RequestView], scheduled: list[RequestView]) -> RequestView:
        """Whom to preempt for `current`'s blocks: the last-admitted running request not yet
        scheduled this step (FCFS: vLLM pops its running list's tail), or under the priority
        policy the running request of the largest key, scheduled this step or not."""
        candidates = [*scheduled, current, *queue] if self.priority else [current, *queue]
        return max(candidates, key=self._order)  # (in vLLM's running list order, for ties)

    @staticmethod
    def _held(view: RequestView, kv: KVState | None) -> int:
        """Blocks `view` holds: as the server says, else what its context fills."""
        if kv is None:
            return 0
        return view.kv_blocks if view.kv_blocks is not None else kv.blocks_for(view.context_len)

    def _growth(self, view: RequestView, kv: KVState | None) -> int:
        """Blocks a running request needs more to decode its next token."""
        return max(0, kv.blocks_for(view.context_len + 1) - self._held(view, kv)) if kv is not None else 0

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        kv = state.kv
        live = {v.request_id for v in state.requests}
        self.order = {rid: n for rid, n in self.order.items() if rid in live}
        running = sorted(state.running, key=self._rank)
        prefilling = sorted((v for v in state.waiting if v.status == "prefilling"), key=self._rank)
        budget = self.max_num_batched_tokens
        free = kv.free_blocks if kv is not None else None
        host = kv.host_free_tokens if kv is not None and kv.host_free_tokens is not None else 0
        victims: list[RequestView] = []  # preempted this step, in the order chosen
        done: list[RequestView] = []  # running requests scheduled this step
        queue = list(running)
        while queue and budget > 0:
            v = queue.pop(0)
            need = self._growth(v, kv)
            while free is not None and need > free:
                victim = self._victim(v, queue, done)
                victims.append(victim)
                free += self._held(victim, kv)
                if victim is v:
                    break
                if victim in queue:
                    queue.remove(victim)
                else:  # scheduled earlier this step (priority policy): its token and blocks come back
                    done.remove(victim)
                    budget += 1
                    free += self._growth(victim, kv)
            if victims and victims[-1] is v:
                break
            if free is not None:
                free -= need
            done.append(v)
            budget -= 1
        scheduled = [v.request_id for v in done]
        # prompts part-way through prefill (in vLLM's running list too): their next chunks take
        # tokens and blocks before any new admission; where the blocks are missing, requests
        # admitted after them (priority policy: of a larger key) are preempted (last or largest
        # first), or the chunk waits a step
        admit: list[str] = []
        decoding = {v.request_id: v for v in running if v.request_id in scheduled}
        for v in prefilling:
            chunk = min(v.prompt_len - v.prefilled, max(budget, 0))
            need = max(0, kv.blocks_for(v.prefilled + chunk) - self._held(v, kv)) if kv is not None else 0
            later = sorted((x for x in decoding.values() if self._order(x) > self._order(v)), key=self._order)
            while free is not None and need > free and later:
                victim = later.pop()  # the last-admitted of those admitted after it
                victims.append(victim)
                scheduled.remove(victim.request_id)
                del decoding[victim.request_id]
                free += self._held(victim, kv) + self._growth(victim, kv)
                budget += 1
            if chunk == 0 or (free is not None and need > free):
                continue  # it keeps what it holds and continues when the blocks are there
            admit.append(v.request_id)
            budget -= chunk
            if free is not None:
                free -= need
        restore: list[str] = []
        if not victims:
            in_flight = len(running) + len(prefilling) + sum(v.status == "restoring" for v in state.waiting)
            back = [v for v in state.waiting if v.status == "offloaded"]
            fresh = [v for v in state.waiting if v.status == "waiting"]
            # preempted ones first (vLLM prepends them to its waiting queue), then arrival order;
            # the priority policy's queue is one heap by (priority, arrival time)
            fresh.sort(key=lambda v: (v.num_generated == 0, v.arrival_time))
            line = sorted([*back, *fresh], key=self._key) if self.priority else [*sorted(back, key=self._rank), *fresh]
            for v in line:
                if in_flight >= self.max_num_seqs or budget <= 0:
                    break
                need = kv.blocks_for(v.context_len + 1) if kv is not None else 0
                if free is not None and need > free:
                    break  # head of the line: everything behind it waits too
                if free is not None:
                    free -= need
                in_flight += 1
                self.order[v.request_id] = self._admitted
                self._admitted += 1
                if v.status == "offloaded":
                    restore.append(v.request_id)
                    continue
                admit.append(v.request_id)
                budget -= min(v.context_len, budget)
        swapped, dropped = [], []
        for v in victims:
            if self.offload and v.context_len <= host:
                swapped.append(v.request_id)
                host -= v.context_len
            else:
                dropped.append(v.request_id)
        self.preemptions += len(victims)
        prefill = max(0, self.max_num_batched_tokens - len(scheduled))
        return replace(state.plan, admit=admit, run=scheduled, prefill_budget=prefill, preempt=dropped,
                       offload=swapped, restore=restore)  # fmt: skip
