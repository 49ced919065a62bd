"""KV memory as a pool of fixed-size blocks (vLLM's paged layout): the resource that caps a
GPU's batch, which every scheduler in a comparison shares (DESIGN.md section 10).

A request holds ceil(tokens / block_size) blocks for the KV of its context (and of the draft
tokens a step verifies); `grow` takes what more it needs if the pool has it, `release` gives
everything back. What happens when a block is missing is the scheduler's choice; the pool
only counts it: `waits` (a request left waiting because its blocks were not free) and
`recomputes` (preempted, its KV dropped, to be prefilled again). `HostOffload` is the other
way to preempt (vLLM v0's swap, TokenFlow's offload): the KV is copied to host memory, within
a host budget, and back when the request resumes, each copy at a PCIe bandwidth; the pool
counts `offloads` and `restores`. Which request to preempt, and whether to offload it or
drop it, is a scheduler's plan action (`StepPlan.preempt`, `offload`, `restore`); the replay
also preempts by itself, as vLLM does, when a running request cannot grow.

`kv_tokens_for` sizes a GPU's pool as vLLM does: the memory left after the weights, at a
utilization (0.9 by default), divided by the KV bytes per token.
Not here: which request to preempt or offload (schedulers), the cost of a recompute (the
prefill it becomes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .types import KVState, RequestError, StepPlan, blocks_for

BLOCK_SIZE = 16


@dataclass
class KVPool:
    """Blocks of `block_size` tokens; per request, the blocks it holds."""

    total_blocks: int
    block_size: int = BLOCK_SIZE
    held: dict[str, int] = field(default_factory=dict)
    waits: int = 0
    recomputes: int = 0
    offloads: int = 0
    restores: int = 0
    offload_refused: int = 0  # offloads asked for (plan.offload) that host memory had no room for

    def __post_init__(self) -> None:
        if self.total_blocks < 1 or self.block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of at least one token, got {self.total_blocks} "
                             f"blocks of {self.block_size}")  # fmt: skip

    @classmethod
    def of_tokens(cls, tokens: int, block_size: int = BLOCK_SIZE) -> KVPool:
        """A pool holding `tokens` tokens (rounded down to whole blocks)."""
        return cls(tokens // block_size, block_size)

    @property
    def used(self) -> int:
        return sum(self.held.values())

    @property
    def free(self) -> int:
        return self.total_blocks - self.used

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def fits(self, request_id: str, tokens: int) -> bool:
        """Whether `request_id` can hold `tokens` tokens with the blocks free now."""
        return self.blocks_for(tokens) - self.held.get(request_id, 0) <= self.free

    def grow(self, request_id: str, tokens: int) -> bool:
        """Hold blocks for `tokens` tokens (never fewer than held); False, and nothing taken, if
        they are not free."""
        need = self.blocks_for(tokens) - self.held.get(request_id, 0)
        if need <= 0:
            return True
        if need > self.free:
            return False
        self.held[request_id] = self.held.get(request_id, 0) + need
        return True

    def release(self, request_id: str) -> int:
        """Give back every block `request_id` holds; how many."""
        return self.held.pop(request_id, 0)

    def counts(self) -> dict[str, int]:
        return {"kv_blocks": self.total_blocks, "kv_used": self.used, "kv_waits": self.waits,
                "kv_recomputes": self.recomputes, "kv_offloads": self.offloads,
                "kv_restores": self.restores, "kv_offload_refused": self.offload_refused}  # fmt: skip


# PCIe 4.0 x16 host <-> device copies as measured for pinned memory (~25 GB/s of the link's 32; an
# H100's PCIe 5.0 x16 about twice that)
PCIE_BYTES_PER_S = 25e9


@dataclass
class HostOffload:
    """Host memory for preempted requests' KV: `host_tokens` tokens of room, copies at
    `bytes_per_s` each way of `kv_bytes_per_token` per token. `offload` / `restore` hold and
    give back the room and return the copy's seconds. The replay charges a copy of its own
    preemption to the step that makes it (synchronous, as vLLM v0's swap); a copy a plan asks
    for (`StepPlan.offload` / `restore`) runs beside compute, as TokenFlow's, and costs no step."""

    host_tokens: int
    kv_bytes_per_token: float
    bytes_per_s: float = PCIE_BYTES_PER_S
    held: dict[str, int] = field(default_factory=dict)
    copied_bytes: float = 0.0

    def __post_init__(self) -> None:
        if self.host_tokens < 0 or not self.kv_bytes_per_token > 0 or not self.bytes_per_s > 0:
            raise ValueError(f"host offload needs host_tokens >= 0 and positive bytes per token and bandwidth, got "
                             f"{self.host_tokens}, {self.kv_bytes_per_token}, {self.bytes_per_s}")  # fmt: skip

    @property
    def free(self) -> int:
        return self.host_tokens - sum(self.held.values())

    def seconds(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.bytes_per_s

    def offload(self, request_id: str, tokens: int) -> float | None:
        """Copy `tokens` tokens of `request_id`'s KV to the host: the copy's seconds, or None
        (nothing done) if the host has no room for them."""
        if tokens > self.free:
            return None
        self.held[request_id] = tokens
        self.copied_bytes += tokens * self.kv_bytes_per_token
        return self.seconds(tokens)

    def restore(self, request_id: str) -> float:
        """Copy `request_id`'s KV back and free its host room: the copy's seconds."""
        tokens = self.held.pop(request_id)
        self.copied_bytes += tokens * self.kv_bytes_per_token
        return self.seconds(tokens)

    def drop(self, request_id: str) -> None:
        """Free `request_id`'s host room without copying (it finished or was cancelled)."""
        self.held.pop(request_id, None)


def pool_state(pool: KVPool, host: HostOffload | None) -> KVState:
    """What a server reports of its pool before a step (the engine's and the replay's `kv_state`)."""
    free, per_token = (host.free, host.seconds(1)) if host is not None else (None, 0.0)
    return KVState(pool.block_size, pool.total_blocks, pool.free, free, per_token)


def pool_stats(pool: KVPool, host: HostOffload | None) -> dict[str, float]:
    """The pool's counts and the GB copied to and from host memory (`kv_stats`)."""
    return {**pool.counts(), "kv_copied_gb": (host.copied_bytes if host is not None else 0.0) / 1e9}


def check_kv_moves(plan: StepPlan, running: Mapping[str, int], offloaded: Mapping[str, int], pool: KVPool | None,
                   host: HostOffload | None, batch_room: int) -> None:  # fmt: skip
    """Raise `RequestError` unless `plan`'s preempt and offload name running requests, its
    restore offloaded ones whose blocks are free (each with room for its next token), each
    request once, on a server with the memory they need (a KV pool; host memory to offload to)
    and room in the batch (`batch_room`: requests that may still join it). `running` and
    `offloaded` map request ids to context lengths. The replay's and the engine's rule."""
    named = [*plan.preempt, *plan.offload, *plan.restore]
    if not named:
        return
    if pool is None:
        raise RequestError("preempt, offload and restore need a KV pool: this server has none "
                           "(EngineConfig.kv_tokens, ReplayEngine(kv_tokens=))")  # fmt: skip
    if (plan.offload or plan.restore) and host is None:
        raise RequestError("offload and restore need host memory: this server has none "
                           "(EngineConfig.host_kv_tokens, ReplayEngine(offload=))")  # fmt: skip
    if len(set(named)) < len(named):
        raise RequestError("plan.preempt, offload and restore name a request more than once")
    for name in ("preempt", "offload"):
        wrong = [rid for rid in getattr(plan, name) if rid not in running]
        if wrong:
            raise RequestError(f"plan.{name} names requests that are not running: {wrong[:5]}")
    wrong = [rid for rid in plan.restore if rid not in offloaded]
    if wrong:
        raise RequestError(f"plan.restore names requests that are not offloaded: {wrong[:5]}")
    freed = sum(pool.held.get(rid, 0) for rid in plan.preempt)
    room = host.free if host is not None else 0
    for rid in plan.offload:  # those the host has room for (the others are refused, not an error)
        if running[rid] <= room:
            room -= running[rid]
            freed += pool.held.get(rid, 0)
    if len(plan.restore) > batch_room:
        raise RequestError(f"plan.restore would bring the batch past max_batch_size: room for {batch_room}, "
                           f"{len(plan.restore)} asked")  # fmt: skip
    need = sum(pool.blocks_for(offloaded[rid] + 1) for rid in plan.restore)
    if need > pool.free + freed:
        raise RequestError(f"plan.restore needs {need} KV blocks and {pool.free + freed} are free")


def kv_tokens_for(memory_bytes: float, weight_bytes: float, kv_bytes_per_token: float, utilization: float = 0.9) -> int:
    """Tokens of KV a GPU holds: (memory x utilization - weights) / bytes per token (vLLM's
    sizing; activations and graphs come out of the 10% left). Raises if the weights do not fit."""
    room = memory_bytes * utilization - weight_bytes
    if not 0 < utilization <= 1 or room <= 0 or kv_bytes_per_token <= 0:
        raise ValueError(f"no room for KV: {memory_bytes / 1e9:.1f} GB x {utilization} holds "
                         f"{weight_bytes / 1e9:.1f} GB of weights with nothing left")  # fmt: skip
    return int(room // kv_bytes_per_token)
