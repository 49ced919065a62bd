"""A batched, lossless speculative-decoding engine on Hugging Face causal LMs.

Contract:
- The caller drives it. `add_request` at any time; each `step(plan)` runs one iteration:
  chunked prefill (a prompt-token budget from the plan), draft (each running request drafts
  its own number of tokens, 0 = plain decoding), verify (one batched target forward for all
  rows, optionally on a shorter prefix of each draft chosen by the caller), emit. `step` is
  `draft_step(plan)` followed by `verify(cut)`; a caller that wants to see the drafts before
  choosing what to verify calls the two halves itself.
- Output is lossless (see `adactl.runtime.verify`): greedy equals the target's greedy
  decoding; sampling follows the target's distribution.
- Everything reported is plain data (`adactl.runtime.types`).

A step, top-down: `draft_step` = `Prefill.run` (prefill.py) -> first tokens -> the row
layout for this plan (`Rows.arrange`, rows.py) -> `Proposer.chains` or `.trees` (draft.py)
-> the drafts to the host, once; `verify` = target forwards over the verified prefixes ->
the lossless rule on the device (verify.py) -> accepted counts and tokens to the host,
once -> roll the caches back -> emit. Distributions never leave the device.

Non-goals: no threads, no tokenizer logic beyond turning a prompt into ids, no scheduling
policy (the plan says what runs), no knowledge of controllers.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from .device import graphs_wanted
from .draft import Proposer
from .feature_draft import is_feature_draft
from .graphs import CudaGraphs, StaticShapes
from .kv import HostRow, KVConfig
from .kv_pool import BLOCK_SIZE, HostOffload, KVPool, check_kv_moves, pool_state, pool_stats
from .models import eos_ids, kv_bytes_per_token, output_vocab_size, prompt_ids
from .plan import check_cut, check_plan, segments
from .prefill import Prefill
from .rows import Request, Rows, RowSampling, check_service
from .shapes import catchup_of, verify_computed, verify_split
from .steps import Drafts, Verdict
from .stream import Playback, Stream
from .target import TargetVerifier
from .types import (
    SLO,
    DraftBatch,
    KVState,
    RequestError,
    RequestResult,
    RequestView,
    SamplingParams,
    StepOutcome,
    StepPlan,
)
from .verify import Verifier, process_logits, sample, verify_chains, verify_trees

__all__ = ["Engine", "EngineConfig", "Prompt", "freeze_heap", "run_to_completion", "verify_computed", "verify_split"]

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]] | torch.Tensor


def freeze_heap() -> int:
    """Collect garbage, then move every object alive now into the permanent generation, so that
    no later collection walks them: call once what a server keeps for its lifetime is loaded
    (models, graphs, tokenizer, data), before it serves. vLLM does the same after its warm-up
    (`freeze_gc_heap`), SGLang offers it as `freeze_gc`.

    Measured on this project's CPU with the default pair loaded (`docs/issue30/gc_pauses.py`:
    `bench spec`'s runs at batch 16, three interleaved): 393k objects tracked; a full collection
    of them took 169-200 ms, about once in a few hundred steps, one step at 2.25x its neighbours
    that moved its run's tokens/s by 5%; after freezing, none, and no collection over 1 ms.
    Objects frozen and dropped later are still freed by reference counting; only cycles among
    them stay until `gc.unfreeze()`. Returns the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@dataclass(frozen=True)
class EngineConfig:
    """Engine-wide settings (everything per request lives in `SamplingParams`)."""

    max_batch_size: int = 256
    """Requests running or prefilling at once, at most (vLLM's max_num_seqs)."""
    seed: int = 0
    """Seed of the engine's generator, which seeds the draws of requests without a seed."""
    kv: KVConfig = field(default_factory=KVConfig)
    """KV cache growth and compaction policy."""
    graphs: bool | None = None
    """Decode, verify and draft forwards as CUDA graphs replayed per shape bucket (None: on
    when the target is on CUDA, unless ADACTL_CUDA_GRAPHS=0 or `--no-cuda-graphs`). True on
    the CPU runs the same static-shape forwards with the graphs' bookkeeping, each "replay"
    running the forward again (what the tests check); False: every forward eager, as shapes
    come."""
    shapes: StaticShapes = field(default_factory=StaticShapes)
    """The buckets of static forwards (batch sizes, tokens per row, column blocks)."""
    kv_tokens: int | None = None
    """KV memory, in tokens, counted in 16-token blocks as vLLM's paged pool (None: no limit
    but `max_batch_size`). The same rules as the replay's pool (`adactl.runtime.kv_pool`): a
    request holds the blocks its context needs (and its step's draft); a prompt waits at the
    head of the line until the blocks for all of it are free; a running request that cannot grow preempts
    the last-admitted one (offloaded where host memory has room, else recomputed); a request
    whose prompt and `max_new_tokens` cannot fit is refused. The caches themselves stay
    rectangles (`kv.py`): the pool is the budget every scheduler shares, not the layout."""
    host_kv_tokens: int = 0
    """Host memory for offloaded KV, in tokens (with `kv_tokens`; 0: none, so
    `StepPlan.offload` and `restore` are refused)."""


@dataclass
class _Inflight:
    """State kept between `draft_step()` and `verify()`."""

    rows: int  # decode rows (a prefix of the batch)
    drafting: int  # rows that drafted (a prefix of the decode rows)
    draft_len: torch.Tensor  # [rows] long
    tokens: torch.Tensor  # [rows, K] long, -1 padded (on the CPU)
    drafts: Drafts  # the same tokens and their distributions, on the device
    emitted: dict[str, list[int]]
    finished: dict[str, str]
    joining: list[Request]
    prefill_tokens: int
    prefill_attention: int
    prefill_s: float
    draft_s: float
    moved_before: int = 0  # `Rows.moved` when the step began
    catchup: int = 0  # the draft's catch-up columns past one a drafting row (`runtime.shapes.catchup_of`)


class Engine:
    """Continuous batching with per-row speculation. See the module docstring."""

    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | None = None,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        verifier: Verifier = verify_chains,
        tree_verifier: Callable[..., Any] = verify_trees,
    ) -> None:
        self.config = config or EngineConfig()
        self.target = target.eval()
        self.draft = draft.eval() if draft is not None else None
        self.tokenizer = tokenizer
        self.device = next(target.parameters()).device
        self.vocab_size = output_vocab_size(target)
        # a feature draft (EAGLE-style) reads the target's hidden states and proposes
        # tokens from a reduced vocabulary; a plain draft is any causal LM on the same tokenizer
        self.feature_draft = draft is not None and is_feature_draft(draft)
        self.proposer: Proposer | None = None
        if draft is not None:
            draft_device = next(draft.parameters()).device
            if draft_device != self.device:
                raise ValueError(f"the draft is on {draft_device} but the target on {self.device}: load both on one "
                                 "device (adactl.runtime.models.load_pair)")  # fmt: skip
            draft_vocab = draft.config.target_vocab_size if self.feature_draft else output_vocab_size(draft)
            if draft_vocab != self.vocab_size:
                raise ValueError(
                    f"the draft is for {draft_vocab} output tokens but the target has {self.vocab_size}: "
                    "a draft must share the target's tokenizer"
                )
            self.proposer = Proposer(draft, self.vocab_size, self.device)
        text_config = target.config.get_text_config()
        self.max_context = int(getattr(text_config, "max_position_embeddings", 1 << 30))
        self.eos_ids = eos_ids(target, tokenizer)
        draft_layers = None
        if draft is not None:
            draft_config: Any = draft.get_text_config() if self.feature_draft else draft.config.get_text_config()  # type: ignore[operator]
            draft_layers = int(draft_config.num_hidden_layers)
        graphs = self.config.graphs if self.config.graphs is not None else graphs_wanted(self.device)
        static = self.config.shapes if graphs else None
        self.graphs = CudaGraphs(self.device) if graphs else None
        self.rows = Rows(text_config.num_hidden_layers, draft_layers, self.device, self.config.kv, static, self.graphs)
        self.prefill = Prefill(self.target, self.draft, self.feature_draft, self.rows, self.config.max_batch_size)
        features = self.draft.target_features if self.feature_draft else None  # type: ignore[union-attr]
        self.target_verifier = TargetVerifier(self.target, lambda: self.rows.target, self.device, features,
                                              verifier, tree_verifier)  # fmt: skip
        self._waiting: dict[str, Request] = {}  # arrival order
        self._finished: dict[str, RequestResult] = {}
        self._inflight: _Inflight | None = None
        self._next_id = 0
        self._generator = torch.Generator().manual_seed(self.config.seed)  # seeds of unseeded requests
        self._admissions = 0  # requests that joined the batch so far (their admission order)
        self._restored: set[str] = set()  # restored this step: not the victims of this step's growth
        self.kv, self.host = self._memory()

    def _memory(self) -> tuple[KVPool | None, HostOffload | None]:
        """The KV pool and host memory `config` asks for (None, None: no limit)."""
        cfg = self.config
        if cfg.kv_tokens is None:
            if cfg.host_kv_tokens:
                raise ValueError("host_kv_tokens needs a KV pool to offload from: give kv_tokens too")
            return None, None
        if not isinstance(cfg.kv_tokens, int) or cfg.kv_tokens < BLOCK_SIZE:
            raise ValueError(f"kv_tokens must be an integer >= {BLOCK_SIZE} (one block), got {cfg.kv_tokens!r}")
        if not isinstance(cfg.host_kv_tokens, int) or cfg.host_kv_tokens < 0:
            raise ValueError(f"host_kv_tokens must be an integer >= 0, got {cfg.host_kv_tokens!r}")
        per_token = kv_bytes_per_token(self.target) + (kv_bytes_per_token(self.draft) if self.draft is not None else 0)
        host = HostOffload(cfg.host_kv_tokens, per_token) if cfg.host_kv_tokens else None
        return KVPool.of_tokens(cfg.kv_tokens), host

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        prompt: Prompt,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        slo: SLO | None = None,
        stream: Stream | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises `RequestError` (nothing queued) on bad input.

        slo: service goals (TTFT, TPOT) carried for controllers in `RequestView.slo`.
        stream: how a consumer reads the output (rate, unit, first-unit deadline); the engine
        keeps its account (`RequestView.stream_progress`, `RequestResult.stream_misses`).

        prompt: token ids, a string (tokenized with the tokenizer's special tokens), or chat
        messages `[{"role": ..., "content": ...}]` (the tokenizer's chat template, with the
        generation prompt added).
        """
        sampling = sampling if sampling is not None else SamplingParams()
        sampling.validate()
        check_service(slo, stream, self.tokenizer is not None)
        ids = prompt_ids(prompt, self.tokenizer, self.vocab_size, self.max_context)
        if self.kv is not None and self.kv.blocks_for(len(ids) + sampling.max_new_tokens) > self.kv.total_blocks:
            pool = self.kv.total_blocks * self.kv.block_size
            raise RequestError(f"{len(ids)} prompt + {sampling.max_new_tokens} new tokens need more KV than the "
                               f"pool's {pool} tokens (EngineConfig.kv_tokens)")  # fmt: skip
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        in_use = request_id in self._waiting or request_id in self._finished
        if in_use or any(r.request_id == request_id for r in self.rows.running):
            raise RequestError(f"request id {request_id!r} is already in use")
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        own_seed = int(torch.randint(1 << 62, (1,), generator=self._generator))  # drawn either way
        seed = sampling.seed if sampling.seed is not None else own_seed
        req = Request(request_id, ids, sampling, arrival, seed, slo=slo)
        if stream is not None:
            req.playback = Playback(stream, arrival)
        self._waiting[request_id] = req
        return request_id

    @torch.inference_mode()
    def cancel(self, request_id: str) -> bool:
        """Stop a request now (or at the end of the step in flight); frees its KV cache.

        Returns False if no unfinished request has that id.
        """
        if request_id in self._waiting:
            req = self._waiting.pop(request_id)
            if req in self.rows.prefilling:
                self.rows.drop_prefill({self.rows.prefilling.index(req)})
            self._finish(req, "cancelled")
            return True
        joining = self._inflight.joining if self._inflight is not None else []
        for i, req in enumerate(self.rows.running + joining):  # joining: first token in the step in flight
            if req.request_id == request_id and req.finish_reason is None:
                if self._inflight is not None:
                    req.cancelled = True
                else:
                    self._finish(req, "cancelled")
                    self.rows.drop({i})
                return True
        return False

    def abort_all(self) -> list[str]:
        """Drop every unfinished request and start from empty caches: for a server whose step
        raised midway, leaving the engine in an unknown state. Returns the ids dropped (no
        results are reported for them); finished results not yet popped are kept."""
        joining = self._inflight.joining if self._inflight is not None else []
        reqs = [*self._waiting.values(), *self.rows.running, *joining]
        dropped = list(dict.fromkeys(r.request_id for r in reqs if r.request_id not in self._finished))
        if self.kv is not None:  # (everything: a step that raised may have left a joining prompt's blocks held)
            self.kv.held.clear()
        if self.host is not None:
            self.host.held.clear()
        self.rows.reset()
        self._waiting, self._inflight = {}, None
        return dropped

    def requests(self) -> list[RequestView]:
        """Unfinished requests: waiting or prefilling (arrival order), then running (row order)."""
        now = time.perf_counter()
        held = self.kv.held if self.kv is not None else None
        views = [(r, False) for r in self._waiting.values()] + [(r, True) for r in self.rows.running]
        return [r.view(now, running, held.get(r.request_id, 0) if held is not None else None) for r, running in views]

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self.rows.running)

    def pop_finished(self) -> list[RequestResult]:
        """Finished requests since the last call (each is returned once)."""
        done = list(self._finished.values())
        self._finished.clear()
        return done

    def close(self) -> None:
        """Drop every request and free the KV caches and graphs (`abort_all` with nothing kept
        allocated, a reservation given up); the engine can serve again afterwards, allocating anew."""
        self.abort_all()
        self.rows.close()

    def reserve(self, rows: int, columns: int) -> None:
        """Allocate the batch's KV now for `rows` running requests of `columns` cache columns
        each (a request's prompt, output and draft tokens, and the holes rejected drafts leave
        until compaction), target and draft alike, and keep it: below that the caches never
        grow or shrink, so with CUDA graphs none is dropped and captured again for a growth (at
        the 8B shape on an H200 a capture took 80-700 ms against 9-40 ms steps, and a growing
        batch recaptured 176 times in 304 steps). For a server that knows its largest batch and
        context, as vLLM sizes its KV at start-up. Kept over `abort_all`; `close` gives it up.
        Every static forward attends over the whole capacity, so reserve what will be used."""
        if not isinstance(rows, int) or not 1 <= rows <= self.config.max_batch_size:
            raise ValueError(f"reserve: rows must be an integer in 1..{self.config.max_batch_size}, got {rows!r}")
        if not isinstance(columns, int) or columns < 1:
            raise ValueError(f"reserve: columns must be an integer >= 1, got {columns!r}")
        self.rows.reserve(rows, columns)

    @torch.inference_mode()
    def warm_up(self, rows: Sequence[int] | None = None, draft_lens: Sequence[int] = (0,)) -> int:
        """Capture before serving the graphs the first steps would otherwise capture while
        requests wait (80-700 ms each at the 8B shape on an H200): for each batch size of
        `rows`, largest first as vLLM and SGLang capture (default: every static row bucket up to
        the reservation's rows), a step of each draft length in `draft_lens` (0: plain
        decoding), on dummy one-token requests that `abort_all` then drops, keeping the graphs.
        Needs an idle engine and a reservation (`reserve`: a growth would drop what it
        captures). Returns the graphs captured; 0 where there are no graphs (the CPU, unless
        `EngineConfig(graphs=True)`)."""
        if self.graphs is None:
            return 0
        if self.has_unfinished():
            raise RuntimeError("warm_up needs an idle engine: it runs dummy requests, then drops every request")
        reserved = self.rows.target.reserved[0]
        if reserved == 0:
            raise ValueError("warm_up needs a reservation first (Engine.reserve(rows, columns)): a growth of the "
                             "caches would drop the graphs it captures")  # fmt: skip
        sizes = sorted(set(rows if rows is not None else [b for b in self.config.shapes.rows if b <= reserved]),
                       reverse=True)  # fmt: skip
        if not sizes or sizes[-1] < 1 or sizes[0] > reserved:
            raise ValueError(f"warm_up: batch sizes must lie in 1..{reserved} (the reservation), got {list(sizes)}")
        longest = self.config.shapes.tokens[-1] - 1 if self.draft is not None else 0  # longer chains run eagerly
        if any(not isinstance(k, int) or not 0 <= k <= longest for k in draft_lens):
            raise ValueError(f"warm_up: draft lengths must be integers in 0..{longest}, got {list(draft_lens)}")
        before = self.graphs.captures
        need = 2 + len(sizes) * sum(k + 1 for k in draft_lens)
        sampling = SamplingParams(max_new_tokens=need, temperature=0.0, stop_on_eos=False)
        ids = [self.add_request([1], sampling, request_id=f"warm-up-{i}") for i in range(sizes[0])]
        try:
            for _ in range(8):  # one step admits them all, unless a KV pool (kv_tokens) holds some back
                if not self._waiting:
                    break
                self.step(StepPlan(draft_len=0, prefill_budget=sizes[0]))
            if len(self.rows.running) < sizes[0]:
                raise RuntimeError(f"warm_up could not run {sizes[0]} dummy requests at once (a KV pool too small?)")
            for b in sizes:
                for k in draft_lens:
                    self.step(StepPlan(draft_len=k, run=ids[:b], prefill_budget=0))
        finally:
            self.abort_all()
            self.pop_finished()
        return self.graphs.captures - before

    @torch.inference_mode()
    def pack(self) -> bool:
        """Pack the batch caches' rows left now, between steps: the holes rejected drafts left
        are dropped and the next forward attends over the columns the longest row needs. A
        forward attends over its rows' widest column, holes included, and compaction waits
        until holes waste a quarter of the columns, so a step costs what the cache's history
        made it: at batch 32 a plain step took 131 ms on a packed cache and 155 ms on one a
        profile's drafts had left holes in (the 2-core CPU; `adactl profile` packs before each
        round). True if anything moved."""
        if self._inflight is not None:
            raise RuntimeError("pack() between steps: the drafts in flight are not verified yet")
        return any([kv.pack() for kv in (self.rows.target, self.rows.draft) if kv is not None])

    def graph_stats(self) -> dict[str, int]:
        """Graphs captured and held, and forwards that could not be captured (eager for good)."""
        g = self.graphs
        if g is None:
            return {"captures": 0, "graphs": 0, "capture_failures": 0}
        return {"captures": g.captures, "graphs": len(g.graphs), "capture_failures": g.capture_failures}

    def kv_bytes(self, include_draft: bool = True) -> int:
        """Bytes held by KV caches: the batch and prefill caches of the target (and the draft's)."""
        return self.rows.nbytes(include_draft)

    def cached_tokens(self) -> int:
        """Real tokens held in the target's batch cache."""
        return self.rows.target.cached_tokens()

    @property
    def max_batch_size(self) -> int:
        """The most requests running or prefilling at once (`EngineConfig.max_batch_size`)."""
        return self.config.max_batch_size

    def kv_state(self) -> KVState | None:
        """The KV pool before the next step, for memory-aware schedulers (None without a pool)."""
        return pool_state(self.kv, self.host) if self.kv is not None else None

    def kv_stats(self) -> dict[str, float]:
        """The KV pool's blocks and what it made wait, recompute, offload and restore, and the
        bytes copied to and from host memory (empty without a pool)."""
        return pool_stats(self.kv, self.host) if self.kv is not None else {}

    # -------------------------------------------------------------------- step
    def step(
        self, plan: StepPlan | None = None, choose_verify: Callable[[DraftBatch], Sequence[int]] | None = None
    ) -> StepOutcome:
        """One engine iteration: `draft_step(plan)`, then `verify(choose_verify(drafts))`."""
        drafts = self.draft_step(plan)
        return self.verify(choose_verify(drafts) if choose_verify is not None else None)

    @torch.inference_mode()
    def draft_step(self, plan: StepPlan | None = None) -> DraftBatch:
        """First half of a step: prefill within the budget, then draft. Call `verify` next."""
        if self._inflight is not None:
            raise RuntimeError("the previous step's drafts are not verified yet: call verify() first")
        plan = plan if plan is not None else StepPlan()
        run_ids, admit = check_plan(plan, self.rows.running, self._waiting)
        offloaded = {rid: r.context_len for rid, r in self._waiting.items() if r.host is not None}
        check_kv_moves(plan, {r.request_id: r.context_len for r in self.rows.running}, offloaded, self.kv, self.host,
                       self.config.max_batch_size - len(self.rows.running) - len(self.rows.prefilling))  # fmt: skip
        t0 = self._now()
        moved_before = self.rows.moved
        self._restored = set()
        self._move(plan)
        if plan.run is None:  # (restored requests run too; moved ones do not)
            run_ids = {r.request_id for r in self.rows.running}
        emitted: dict[str, list[int]] = {}
        finished: dict[str, str] = {}
        admit = self._restore_admitted(admit)
        joining, prefill_tokens, prefill_attention = self._prefill(plan.prefill_budget, admit, emitted, finished)
        t1 = self._now()
        can_draft = self.draft is not None
        groups, lens, specs = segments(self.rows.running, run_ids, plan, self.max_context, can_draft)
        if self.kv is not None and self._make_room(lens):  # preempted some: the segments again without them
            groups, lens, specs = segments(self.rows.running, run_ids, plan, self.max_context, can_draft)
        self.rows.arrange(groups)
        n_draft = sum(len(g) for g in groups[:-2])
        n_rows = n_draft + len(groups[-2])
        drafting = self.rows.running[:n_draft]  # (in row order: a segment's order is free)
        catchup = catchup_of([len(r.draft_pending) for r in drafting]) if self.proposer is not None else 0
        draft_len = torch.tensor([lens[r.request_id] for r in self.rows.running[:n_rows]], dtype=torch.long)
        if self.proposer is None or self.rows.draft is None:
            drafts = Drafts(torch.full((n_rows, 0), -1, device=self.device),
                            torch.zeros(n_rows, 0, self.vocab_size, device=self.device))  # fmt: skip
        elif specs is not None:
            tree_specs = [specs[r.request_id] for r in drafting]
            drafts = self.proposer.trees(self.rows.draft, drafting, tree_specs, n_rows)
        else:
            drafts = self.proposer.chains(self.rows.draft, drafting, draft_len[:n_draft], n_rows)
        tokens, summary = drafts.to_host(draft_len, self.proposer.support if self.proposer is not None else None)
        if drafts.parents is not None:
            draft_len = (tokens >= 0).sum(1)  # a tree may come out smaller than its spec
        t2 = self._now()
        self._inflight = _Inflight(
            n_rows,
            n_draft,
            draft_len,
            tokens,
            drafts,
            emitted,
            finished,
            joining,
            prefill_tokens,
            prefill_attention,
            t1 - t0,
            t2 - t1,
            moved_before,
            catchup,
        )
        rows = self.rows.running[:n_rows]
        return DraftBatch(
            request_ids=tuple(r.request_id for r in rows),
            tokens=tokens,
            draft_len=draft_len,
            probs=drafts.probs,
            context_len=torch.tensor([r.context_len for r in rows], dtype=torch.long),
            greedy=torch.tensor([r.sampling.temperature <= 0 for r in rows], dtype=torch.bool),
            companion_probs=drafts.companion_probs,
            support=self.proposer.support if self.proposer is not None else None,
            parents=drafts.parents,
            summary=summary,
        )

    @torch.inference_mode()
    def verify(self, verify_len: Sequence[int] | torch.Tensor | None = None) -> StepOutcome:
        """Second half of a step: verify a prefix of each draft (default: all of it), emit.

        verify_len: [B] per decode row (the order of `DraftBatch.request_ids`), each in
        [0, draft_len]. An invalid cut raises `RequestError` and leaves the step pending.
        """
        fl = self._inflight
        if fl is None:
            raise RuntimeError("no drafts to verify: call draft_step() (or step()) first")
        cut = check_cut(verify_len, fl.draft_len)
        t0 = self._now()
        rows = self.rows.running[: fl.rows]
        accepted, path = torch.zeros(fl.rows, dtype=torch.long), None
        if fl.rows:
            verdict = self.target_verifier.verify(rows, fl.drafts, fl.draft_len, cut)
            self._emit(rows, fl, verdict)
            accepted, path = verdict.accepted, verdict.path
        done = {i for i, r in enumerate(self.rows.running) if r.finish_reason is not None or r.cancelled}
        for i in sorted(done):
            req = self.rows.running[i]
            fl.finished[req.request_id] = self._finish(req, req.finish_reason or "cancelled")
        self.rows.drop(done)
        for req in fl.joining:
            if req.cancelled:
                fl.finished[req.request_id] = self._finish(req, "cancelled")
        self.rows.drop_prefill({i for i, r in enumerate(self.rows.prefilling) if r.cancelled})
        self.rows.join([r for r in fl.joining if not r.cancelled])
        self._inflight = None
        verify_s = self._now() - t0
        return StepOutcome(
            request_ids=tuple(r.request_id for r in rows),
            drafted=fl.draft_len,
            verified=cut,
            accepted=accepted,
            emitted=fl.emitted,
            finished=fl.finished,
            prefill_tokens=fl.prefill_tokens,
            prefill_attention=fl.prefill_attention,
            moved_tokens=self.rows.moved - fl.moved_before,
            catchup_tokens=fl.catchup,
            prefill_s=fl.prefill_s,
            draft_s=fl.draft_s,
            verify_s=verify_s,
            total_s=fl.prefill_s + fl.draft_s + verify_s,
            path=path,
        )

    @torch.inference_mode()
    def peek_target(self) -> torch.Tensor:
        """The target's processed distributions at every position of the pending drafts,
        [B, K + 1, V] on the engine's device (position j: after the context and draft tokens
        0..j-1; for a tree, position j + 1: after node j and its ancestors), computed and then
        forgotten: the caches are as they were, and the step's randomness is untouched.

        For oracles and analysis only (it costs one full verify forward): what a controller
        that knew the target's verdict in advance would see. Call between `draft_step` and
        `verify`; time it between two `synchronize()` calls.
        """
        fl = self._inflight
        if fl is None:
            raise RuntimeError("no drafts pending: call draft_step() first")
        rows = self.rows.running[: fl.rows]
        if not rows:
            return torch.zeros(0, fl.tokens.shape[1] + 1, self.vocab_size, device=self.device)
        return self.target_verifier.peek(rows, fl.drafts, fl.draft_len)

    def synchronize(self) -> None:
        """Wait for the work queued on the engine's device (for timing)."""
        self._now()

    # ---------------------------------------------------------------- memory
    def _move(self, plan: StepPlan) -> None:
        """Apply a checked plan's preempt, offload and restore (copies here are synchronous:
        a restored request decodes in this very step)."""
        by_id = {r.request_id: r for r in self.rows.running}
        for rid in plan.preempt:
            self._preempt(by_id[rid], offload=False)
        for rid in plan.offload:
            assert self.kv is not None and self.host is not None
            if self.host.offload(rid, by_id[rid].context_len) is None:  # no host room: refused, it keeps running
                self.kv.offload_refused += 1
                continue
            self._park(by_id[rid], self.rows.to_host(by_id[rid]))
            self.kv.offloads += 1
        for rid in plan.restore:
            grown = self._restore(self._waiting[rid])
            assert grown, "checked by check_kv_moves"

    def _restore(self, req: Request) -> bool:
        """Bring an offloaded request's KV back as a running row; False (nothing done) if its
        blocks are not free."""
        assert self.kv is not None and self.host is not None and req.host is not None
        if not self.kv.grow(req.request_id, req.context_len + 1):
            return False
        self.host.restore(req.request_id)
        self.rows.from_host(req, req.host)
        del self._waiting[req.request_id]
        req.host, req.admitted = None, self._admit()
        self.kv.restores += 1
        self._restored.add(req.request_id)
        return True

    def _restore_admitted(self, admit: list[Request]) -> list[Request]:
        """Walk `admit` in order, restoring the offloaded requests while their blocks are free
        and the batch has room; the requests to prefill: those before the first restore that
        must wait (the head of the line blocks there, as in the replay)."""
        room = self.config.max_batch_size - len(self.rows.running) - len(self.rows.prefilling)
        to_prefill = []
        for req in admit:
            if req.host is None:
                to_prefill.append(req)
                continue
            if room <= 0 or not self._restore(req):
                assert self.kv is not None
                self.kv.waits += room > 0
                break
            room -= 1
        return to_prefill

    def _make_room(self, lens: dict[str, int]) -> bool:
        """Blocks for every running request's context and this step's draft (in admission
        order); where they are missing, the last-admitted running request is preempted (as the
        replay's pool, and vLLM, do) until they are not. Whether any was preempted."""
        assert self.kv is not None
        preempted = False
        for req in sorted(self.rows.running, key=lambda r: r.admitted):
            if req not in self.rows.running or req.request_id not in lens:  # preempted meanwhile; deferred
                continue
            while not self.kv.grow(req.request_id, req.context_len + lens[req.request_id] + 1):
                # (not a request restored this step: that would copy it back out at once)
                others = [r for r in self.rows.running if r.request_id not in self._restored]
                victim = max(others or [req], key=lambda r: r.admitted)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
        return preempted

    def _preempt(self, req: Request, offload: bool = True) -> None:
        """Take a running request's KV: to host memory if `offload` and the host has room
        (it resumes by a restore), else dropped (it prefills its whole context again)."""
        assert self.kv is not None
        if offload and self.host is not None and self.host.offload(req.request_id, req.context_len) is not None:
            self._park(req, self.rows.to_host(req))
            self.kv.offloads += 1
            return
        self.rows.remove(req)
        req.recompute()
        self._park(req, None)
        self.kv.recomputes += 1

    def _park(self, req: Request, host: tuple[HostRow, HostRow | None] | None) -> None:
        """A request off the batch (its row already gone) waits at the head of the line, behind
        the prompts part-way through prefill (they hold blocks: vLLM's running queue)."""
        assert self.kv is not None
        self.kv.release(req.request_id)
        req.host = host
        req.preemptions += 1
        started = {rid: r for rid, r in self._waiting.items() if r.prefilled and r.host is None}
        self._waiting = {**started, req.request_id: req, **self._waiting}

    def _grow(self, req: Request, tokens: int) -> bool:
        """Take the blocks for `req` to hold `tokens` tokens (a prefill chunk); counts a wait."""
        if self.kv is None:
            return True
        if self.kv.grow(req.request_id, tokens):
            return True
        self.kv.waits += 1
        return False

    def _admit(self) -> int:
        self._admissions += 1
        return self._admissions

    def _release(self, request_id: str) -> None:
        """Free what a request holds of the KV pool and of host memory."""
        if self.kv is not None:
            self.kv.release(request_id)
        if self.host is not None:
            self.host.drop(request_id)

    # ----------------------------------------------------------------- phases
    def _prefill(
        self, budget: int, admit: list[Request], emitted: dict[str, list[int]], finished: dict[str, str]
    ) -> tuple[list[Request], int, int]:
        """Prefill within the budget; requests whose prompt completes emit their first token
        (sampled together) and join the batch at the end of the step. Returns them, the prompt
        tokens computed and their attention's query-key pairs."""
        done, logits, used, pairs = self.prefill.run(budget, admit, self._grow if self.kv is not None else None)
        if not done or logits is None:
            return [], used, pairs
        s = RowSampling(done, self.device)
        first = sample(process_logits(logits, s.temperature, s.top_p), s.greedy, s.uniforms([1] * len(done), 1)[:, 0])
        now = self._now()
        joining: list[Request] = []
        for req, token in zip(done, first.tolist()):
            del self._waiting[req.request_id]
            if req.first_token_time is None:  # (a recomputed request's is its first token's)
                req.first_token_time = now
            req.admitted = self._admit()
            emitted[req.request_id] = self._append_output(req, [token])
            if req.finish_reason is not None:
                finished[req.request_id] = self._finish(req, req.finish_reason)
                continue
            req.target_pending, req.draft_pending = [token], [token]
            if self.feature_draft:
                assert req.last_feature is not None
                req.draft_features, req.last_feature = [req.last_feature[None]], None
            joining.append(req)
        self.rows.drop_prefill({i for i, r in enumerate(self.rows.prefilling) if r.finish_reason is not None})
        return joining, used, pairs

    def _emit(self, rows: list[Request], fl: _Inflight, verdict: Verdict) -> None:
        new = []
        drafted, following = fl.tokens.tolist(), verdict.next_token.tolist()
        for i, req in enumerate(rows):
            # the accepted draft nodes (a chain's first a; a tree's path), then the target's token
            tokens = [drafted[i][j] for j in verdict.nodes[i]] + [following[i]]
            fl.emitted[req.request_id] = self._append_output(req, tokens)
            req.target_pending = tokens[-1:]
            new.append(tokens)
        if self.proposer is not None and self.rows.draft is not None:
            self.proposer.settle(self.rows.draft, rows, fl.drafting, fl.tokens, fl.draft_len, verdict, new)

    # ------------------------------------------------------------ bookkeeping
    def _append_output(self, req: Request, tokens: list[int]) -> list[int]:
        return req.append(tokens, self.eos_ids, self.max_context, self.tokenizer)

    def _finish(self, req: Request, reason: str) -> str:
        self._release(req.request_id)
        self._finished[req.request_id] = req.result(reason, self._now(), self.tokenizer)
        return reason

    def _now(self) -> float:
        if self.device.type == "cuda":  # step timings feed the step-cost model: wait for the kernels
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()
        return time.perf_counter()


def run_to_completion(
    engine: Engine, plan: StepPlan | None = None, max_steps: int = 1_000_000
) -> dict[str, RequestResult]:
    """Step until every queued request has finished; returns results by request id."""
    results: dict[str, RequestResult] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        engine.step(plan)
        results.update({r.request_id: r for r in engine.pop_finished()})
    results.update({r.request_id: r for r in engine.pop_finished()})
    return results
