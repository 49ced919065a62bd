"""Plain data the engine takes and reports: what a controller or a custom server sees.

Nothing here refers to engine internals (caches, row order), so a server that is not our
runtime can build the same objects and drive the same controllers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import RequestError as RequestError  # re-exported: requests and plans raise it from here
from .stream import Stream, StreamProgress


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded."""

    max_new_tokens: int = 256
    """Tokens to generate at most (the request ends earlier on EOS)."""
    temperature: float = 0.0
    """0 = greedy decoding; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 keeps the whole distribution."""
    stop_on_eos: bool = True
    """End the request when the model emits an end-of-sequence token."""
    seed: int | None = None
    """Seed of this request's own random draws (None: the engine's generator). A seeded
    request samples the same tokens whatever else is in the batch."""

    def validate(self) -> None:
        """Raise `RequestError` saying what is wrong."""
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool):
            raise RequestError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens <= 0:
            raise RequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise RequestError(f"seed must be an integer >= 0 or None, got {self.seed!r}")


@dataclass(frozen=True)
class SLO:
    """A request's service goals: what SLO-aware controllers schedule for. The engine only
    carries them (in `RequestView.slo`); it decodes the same with or without."""

    ttft_s: float | None = None
    """Time to first token, seconds from arrival (None: no goal)."""
    tpot_s: float | None = None
    """Time per output token after the first, seconds (None: no goal)."""
    priority: int = 0
    """Scheduling priority, lower first (vLLM's request `priority`): what a priority policy
    (`vllm-v1-priority`) orders its queue and chooses victims by; other schedulers ignore it."""

    def validate(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if v is not None and (not _is_real(v) or v <= 0):
                raise RequestError(f"{name} must be a number > 0 or None, got {v!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise RequestError(f"priority must be an integer, got {self.priority!r}")


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class RequestView:
    """One unfinished request, as a controller sees it."""

    request_id: str
    status: str  # "waiting" (no prompt token computed) | "prefilling" | "running" | "offloaded" | "restoring"
    prompt_len: int
    prefilled: int  # prompt tokens computed so far
    num_generated: int  # tokens emitted so far
    context_len: int  # prompt_len + num_generated
    arrival_time: float  # time.perf_counter() clock
    first_token_time: float | None
    sampling: SamplingParams
    slo: SLO | None = None  # the request's service goals, if it has any
    stream: Stream | None = None  # how its output is consumed, if it streams
    stream_progress: StreamProgress | None = None  # the consumer's position now (with `stream`)
    kv: str = "device"  # where its KV is: "device" | "host" (offloaded) | "none" (nothing computed, or preempted)
    kv_ready_at: float | None = None  # a restore in flight: when its KV is back and it can decode (server clock)
    kv_blocks: int | None = None  # KV blocks it holds on the device (None: the server does not say)
    draft_lag: int = 1  # tokens it emitted that the draft model has not read (its next draft feeds them first)

    @property
    def draft_room(self) -> int:
        """Draft tokens this request can still use: what it may generate after this step's one."""
        return max(0, self.sampling.max_new_tokens - self.num_generated - 1)


@dataclass(frozen=True)
class KVState:
    """The server's KV memory before a step, in blocks of `block_size` tokens (vLLM's paged
    layout): what memory-aware schedulers plan with."""

    block_size: int
    total_blocks: int
    free_blocks: int
    host_free_tokens: int | None = None  # room left in host memory for offloaded KV (None: no offload)
    copy_s_per_token: float = 0.0  # seconds one token's KV takes to copy between host and device

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return blocks_for(tokens, self.block_size)


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks of `block_size` tokens that hold `tokens` tokens (the KV pool's and its report's rule)."""
    return -(-max(tokens, 0) // block_size)


@dataclass(frozen=True)
class TreeSpec:
    """How a request drafts a token tree (EAGLE-2's dynamic expansion): `depth` levels; at each
    level the `width` nodes of highest path value (product of the draft's probabilities along
    the path) are expanded, each proposing its `width` most likely children (greedy rows) or
    `width` children drawn without replacement (sampled rows); the best `nodes` of everything
    proposed are kept. `TreeSpec(depth=k, width=1, nodes=k)` is a chain of k tokens."""

    depth: int = 4
    width: int = 2
    nodes: int = 8

    def validate(self) -> None:
        for name in ("depth", "width", "nodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RequestError(f"TreeSpec.{name} must be an integer >= 0, got {v!r}")
        if self.width == 0 and self.depth > 0:
            raise RequestError("TreeSpec.width must be >= 1 when depth > 0")

    @property
    def max_nodes(self) -> int:
        """Nodes kept at most: `nodes`, and no more than the expansion proposes."""
        proposed = self.width + (self.depth - 1) * self.width**2 if self.depth else 0
        return min(self.nodes, proposed)


@dataclass(frozen=True)
class StepPlan:
    """The schedule decision for one engine step (DESIGN.md section 2)."""

    draft_len: int | Mapping[str, int] = 0
    """Tokens each running request drafts this step: one number for all, or per request id
    (missing ids draft 0). 0 = plain decoding. Clipped to what a request can still emit."""
    prefill_budget: int = 512
    """Prompt tokens computed at most this step (chunked prefill), over all waiting requests."""
    admit: Sequence[str] | None = None
    """Waiting requests allowed to start or continue prefill, in order; None = all, first come
    first served."""
    run: Sequence[str] | None = None
    """Running requests that decode this step; None = all. The others are deferred and keep
    their KV cache."""
    tree: TreeSpec | Mapping[str, TreeSpec] | None = None
    """Token trees instead of chains: one spec for every running request, or per request id
    (the others draft chains of `draft_len`, as one-child trees). None = chains only."""
    preempt: Sequence[str] = ()
    """Running requests whose KV is dropped before this step (recompute preemption, vLLM's
    default): each keeps its output, waits at the head of the line (status "waiting", kv
    "none") and prefills its prompt and output again when admitted."""
    offload: Sequence[str] = ()
    """Running requests whose KV is copied to host memory and freed on the device before this
    step (status "offloaded", kv "host"): the copy runs beside compute, at the server's
    host-device bandwidth, within its host budget. Where the host has no room the offload is
    refused, counted, and the request keeps running: nothing is lost."""
    restore: Sequence[str] = ()
    """Offloaded requests whose KV is copied back (device blocks taken now): each decodes from
    the first step after its copy completes (`RequestView.kv_ready_at`; status "restoring")."""


@dataclass(frozen=True)
class DraftSummary:
    """What controllers read of the draft distributions: [B, K] float32 per draft position
    (0 where nothing was drafted), on the CPU. The engine computes it on its device and
    brings it over with the tokens, so whole vocabulary rows never leave the device."""

    token_prob: torch.Tensor  # the draft's probability of its own token
    entropy: torch.Tensor  # of the draft distribution over its support, in nats
    margin: torch.Tensor  # top-1 minus top-2 probability
    companion_token_prob: torch.Tensor | None = None  # the companion's probability of the drafted token
    overlap: torch.Tensor | None = None  # sum_v min(draft(v), companion(v)) over the draft's support


def summarize_drafts(
    tokens: torch.Tensor,
    draft_len: torch.Tensor,
    probs: torch.Tensor,
    companion_probs: torch.Tensor | None = None,
    support: torch.Tensor | None = None,
) -> DraftSummary:
    """`DraftSummary` from whole distributions, on their device (tokens [B, K], draft_len [B],
    probs and companion_probs [B, K, V], support [N] ids outside which probs is 0)."""
    dev = probs.device
    k = tokens.shape[1]
    drafted = (torch.arange(k, device=dev)[None, :] < draft_len.to(dev)[:, None]).float()
    idx = tokens.to(dev).clamp(min=0)[..., None]
    own = probs.gather(-1, idx)[..., 0] * drafted
    on_support = probs if support is None else probs.index_select(-1, support.to(dev))
    entropy = torch.special.entr(on_support).sum(-1)
    if on_support.shape[-1] >= 2:
        top = on_support.topk(2, dim=-1).values
    else:
        top = torch.cat([on_support, torch.zeros_like(on_support)], -1)
    summary = DraftSummary(own, entropy, top[..., 0] - top[..., 1])
    if companion_probs is None:
        return summary
    comp = companion_probs.gather(-1, idx)[..., 0] * drafted
    comp_on_support = companion_probs if support is None else companion_probs.index_select(-1, support.to(dev))
    overlap = torch.minimum(on_support, comp_on_support).sum(-1) * drafted  # min(q, c) is 0 where q is
    return DraftSummary(own, entropy, summary.margin, comp, overlap)


@dataclass(frozen=True)
class DraftBatch:
    """The drafts of one step, at the verify decision point. Everything is on the CPU but
    the whole distributions (`probs`, `companion_probs`), which stay on the engine's device:
    read `summarized()` unless you need whole rows."""

    request_ids: tuple[str, ...]  # [B] running requests that decode this step, in row order
    tokens: torch.Tensor  # [B, K] long draft tokens, -1 past a row's draft_len
    draft_len: torch.Tensor  # [B] long tokens drafted per row (0 = no speculation)
    probs: torch.Tensor  # [B, K, V] float32 processed draft distribution each token was drawn from
    context_len: torch.Tensor  # [B] long tokens in each row's context before this step
    greedy: torch.Tensor  # [B] bool rows decoded greedily (temperature 0)
    companion_probs: torch.Tensor | None = None  # [B, K, V] float32 the companion's, at each draft position
    support: torch.Tensor | None = None  # [N] long token ids outside which `probs` is 0 (None: all V)
    parents: torch.Tensor | None = None
    """[B, K] long, trees only (None: chains). Parent node of each draft node, -1 = a child of
    the row's last token (and -1 past `draft_len`). Nodes come best first (path value, parents
    before children, siblings in draw order), so verifying the first v nodes verifies a tree;
    `probs[i, j]` is the distribution node j was drawn from (its parent's)."""
    summary: DraftSummary | None = None
    """What controllers read of `probs` (None: computed from `probs` on first use)."""

    def summarized(self) -> DraftSummary:
        """The draft distributions' summary per position (`DraftSummary`, on the CPU)."""
        if self.summary is None:
            s = summarize_drafts(self.tokens, self.draft_len, self.probs, self.companion_probs, self.support)
            cpu = [None if t is None else t.cpu() for t in (s.token_prob, s.entropy, s.margin,
                                                            s.companion_token_prob, s.overlap)]  # fmt: skip
            object.__setattr__(self, "summary", DraftSummary(*cpu))  # type: ignore[arg-type]
        assert self.summary is not None
        return self.summary

    def depth(self) -> torch.Tensor:
        """[B, K] long: each node's depth from 0 (= its position in a chain)."""
        k = self.tokens.shape[1]
        if self.parents is None:
            return torch.arange(k)[None, :].expand(self.tokens.shape[0], k).clone()
        return node_depth(self.parents)


@dataclass(frozen=True)
class StepOutcome:
    """What one engine step did. Per-row fields follow `request_ids` (the decode rows)."""

    request_ids: tuple[str, ...]  # [B] requests that decoded this step
    drafted: torch.Tensor  # [B] long draft tokens proposed
    verified: torch.Tensor  # [B] long draft tokens sent to the target (a prefix of the draft)
    accepted: torch.Tensor  # [B] long draft tokens accepted
    emitted: dict[str, list[int]]  # tokens emitted this step, per request (decode and first tokens)
    finished: dict[str, str]  # request id -> reason: "eos" | "length" | "context"
    prefill_tokens: int  # prompt tokens computed this step
    prefill_s: float  # wall seconds in prefill forwards
    draft_s: float  # wall seconds drafting
    verify_s: float  # wall seconds verifying, emitting and cache bookkeeping
    total_s: float = field(default=0.0)  # wall seconds of the whole step
    path: torch.Tensor | None = None  # [B, K] bool, trees only: the accepted draft nodes
    prefill_attention: int = 0  # query-key pairs of the prefill chunks (runtime.shapes.prefill_pairs)
    moved_tokens: int = 0  # KV columns copied to move rows in the batch cache (a deferral, a new draft length)
    catchup_tokens: int = 0  # draft catch-up columns past one a drafting row (`runtime.shapes.catchup_of`)

    @property
    def tokens_emitted(self) -> int:
        return sum(len(t) for t in self.emitted.values())


@dataclass(frozen=True)
class RequestResult:
    """A finished request."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # "eos" | "length" | "context" | "cancelled"
    arrival_time: float
    first_token_time: float | None
    finish_time: float
    stream_units: int | None = None  # units of a streamed output (None: not streamed)
    stream_misses: int | None = None  # missed units (<= stream_units): a stall of d s misses ceil(d * rate)
    stream_read_end: float | None = None  # when its consumer read the last unit (a closed loop's user asks next)


def node_depth(parents: torch.Tensor) -> torch.Tensor:
    """[B, K] depth of each node (0 = a child of the last token) from parents [B, K] (parents
    before children)."""
    depth = torch.zeros_like(parents)
    rows = torch.arange(parents.shape[0])
    for j in range(parents.shape[1]):
        p = parents[:, j]
        depth[:, j] = torch.where(p >= 0, depth[rows, p.clamp(min=0)] + 1, 0)
    return depth
