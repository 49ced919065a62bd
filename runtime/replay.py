"""Profile replay: a stand-in for `Engine` that replays recorded costs instead of running models.

No model runs. A step's duration is the step-time model's prediction for the step's shape
(fitted on profiles the real engine recorded, `train/profile_steps.py`), times a log-normal
noise factor of the profile's spread; a drafted token is accepted with the recorded
conditional acceptance of its position (alpha_j, e.g. the shipped moving average). The
draws are common random numbers: a request's draft at output position p accepts its first
j tokens where the uniforms u[p, 0..j-1] (seeded by the engine's seed and the request id)
fall below alpha_0..alpha_{j-1}, so two controllers serving the same requests see the same
outcome wherever they draft at the same position, and a comparison between them is not
drowned in acceptance noise (greedy replay from traces is exact the same way). Token trees
(`plan.tree`) are drafted from each request's tree trace (`RequestTrace.tree`: every node a
width-W growth proposes at that position): the first `nodes` recorded nodes of depth < the
spec's, and verification walks them with the recorded sibling-conditional acceptance, exact
for greedy rows; a step's draft is priced by the forwards and tokens a tree growth feeds
(`shapes.draft_work`). Time is
simulated (`clock()`), so controllers that read the clock see replayed time, and a load
sweep that takes the real engine an hour runs in seconds, deterministically for a seed.

The request life cycle matches `Engine`: waiting -> prefilling (chunks within the step's
budget, admitted requests in order) -> running (first token when the step's prefill part
ends, as the engine samples it there, before the step's decode forward; a server's client
hears of it at the step's end) -> finished (by length; replayed outputs have no EOS). Deferred rows
keep their place. Streaming consumers are accounted as in the engine, with words and
sentences counted at a fixed number of tokens per unit (there is no text).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .kv_pool import HostOffload, KVPool, check_kv_moves, pool_state, pool_stats
from .shapes import StepShape, arrangement, catchup_of, context_of, draft_work, dropping, moved_rows, prefill_pairs
from .stream import Playback, Stream
from .traces import AcceptanceTraces, RequestTrace, kept
from .tree import chain_spec
from .types import (
    SLO,
    DraftBatch,
    DraftSummary,
    KVState,
    RequestError,
    RequestResult,
    RequestView,
    SamplingParams,
    StepOutcome,
    StepPlan,
    TreeSpec,
)

TOKENS_PER_UNIT = {"token": 1.0, "word": 1.3, "sentence": 20.0}


def replayed_units(unit: str, tokens: int, finished: bool) -> int:
    """Complete units in `tokens` replayed tokens (no text: fixed tokens per unit); at the end
    of the output whatever is left counts as one more unit, as `stream.count_units` has it."""
    units = tokens / TOKENS_PER_UNIT[unit]
    return math.ceil(units) if finished else int(units)


def _path_mask(paths: list[list[int]], shape: torch.Size) -> torch.Tensor:
    """[B, K] bool with row i's `paths[i]` set."""
    mask = np.zeros(tuple(shape), dtype=np.bool_)
    for i, nodes in enumerate(paths):
        mask[i, nodes] = True
    return torch.from_numpy(mask)


@dataclass(frozen=True)
class _Tree:
    """What one row drafts on a tree step: its depth, the tree trace it reads (None: a chain),
    the recorded node ids kept and their parents as indices into them."""

    depth: int
    trace: RequestTrace | None
    ids: np.ndarray
    parents: np.ndarray


@dataclass
class _Replayed:
    request_id: str
    prompt_len: int
    sampling: SamplingParams
    arrival_time: float
    slo: SLO | None
    playback: Playback | None
    prefilled: int = 0
    generated: int = 0
    first_token_time: float | None = None
    draws: random.Random | None = None  # this request's acceptance uniforms, by output position
    uniforms: dict[int, list[float]] | None = None
    trace: RequestTrace | None = None  # recorded acceptance and signals by output position
    prefill_goal: int = 0  # tokens to prefill: the prompt, or the whole context after a preemption (0: the prompt)
    preemptions: int = 0
    offloaded: bool = False  # preempted with its KV in host memory: it resumes by a restore, not a prefill
    ready_at: float | None = None  # a restore (plan.restore) in flight: when its KV is back on the device
    on_host_at: float = 0.0  # when its last asynchronous offload copy completes (a restore starts no sooner)
    lag: int = 1  # tokens emitted that the draft model has not read (the engine's `draft_pending`)

    @property
    def to_prefill(self) -> int:
        return self.prefill_goal or self.prompt_len

    def tree_path(self, ids: Any, parents: Any, cut: int) -> list[int]:
        """The accepted path (indices into `ids`) of a tree drafted at the current output
        position from its tree trace (`RequestTrace.tree_draft`), the first `cut` nodes verified,
        with this request's uniforms for the position's recorded nodes."""
        assert self.draws is not None and self.trace is not None and self.trace.tree is not None
        tree = self.trace.tree
        key = -1 - self.generated  # tree uniforms: negative keys, apart from the chain's
        assert self.uniforms is not None
        u = self.uniforms.get(key)
        if u is None:
            u = self.uniforms[key] = [self.draws.random() for _ in range(int(tree.ratio.shape[1]))]
        return tree.tree_accepted(self.generated, ids, parents, cut, u)

    def accepted(self, alpha: list[float], cut: int) -> int:
        """Tokens of a `cut`-token draft at the current output position the target accepts:
        its trace's, else the flat `alpha`'s, with this request's uniforms at this position."""
        assert self.draws is not None and self.uniforms is not None
        u = self.uniforms.get(self.generated)
        if u is None:
            k = max(len(alpha), int(self.trace.ratio.shape[1]) if self.trace is not None else 0)
            u = self.uniforms[self.generated] = [self.draws.random() for _ in range(k)]
        if self.trace is not None:
            return self.trace.accepted(self.generated, cut, u)
        return kept(u, alpha, cut)

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.generated


class ReplayEngine:
    """Implements what `ControlLoop` needs of an engine (`adactl.loop.EngineLike`) plus
    `add_request`, `cancel`, `step` and `clock`."""

    def __init__(self, step_time: Any, alpha: Sequence[float] = (), max_batch_size: int = 64, noise: float = 0.0,
                 seed: int = 0, max_context: int = 8192, traces: AcceptanceTraces | None = None,
                 kv_tokens: int | None = None, offload: HostOffload | None = None) -> None:  # fmt: skip
        """step_time: a step-time predictor (`predict_parts` or `predict` over `StepShape`s).
        alpha: conditional acceptance by draft position (empty: no draft model).
        noise: standard deviation of the log step-time factor (0: exactly the prediction).
        traces: per-request acceptance (adactl.runtime.traces): each request follows one (given
        to `add_request`, else the next recorded at its temperature), and its drafts carry the
        recorded signals; alpha then only serves requests without one.
        kv_tokens: KV memory as a pool of 16-token blocks (adactl.runtime.kv_pool; None: no
        limit but `max_batch_size`): a request holds the blocks its context needs (and its
        step's draft), a prompt waits (head of the line, as vLLM v1) until the blocks for all
        of it are free, and a running request that cannot grow preempts the last-admitted one by recompute
        (its KV dropped, its whole context prefilled again); `kv_stats()` counts both.
        offload: host memory for preempted requests' KV (adactl.runtime.kv_pool.HostOffload,
        with kv_tokens): a request the replay preempts has its KV copied there while it has room
        (else recomputed) and back when it resumes, without a prefill; each such copy's seconds
        are added to the prefill part of the step that makes it, outside the step-time noise.
        Copies a plan asks for (`StepPlan.offload` / `restore`) are asynchronous instead
        (`_move`)."""
        self.step_time, self.alpha = step_time, [float(a) for a in alpha]
        self.max_batch_size, self.noise, self.max_context = max_batch_size, noise, max_context
        if traces is not None and traces.tree is not None:
            raise ValueError("a tree trace replays with the chain traces of its requests: pass "
                             "chains.with_trees(trees)")  # fmt: skip
        self.traces = traces if traces is not None and len(traces) else None
        self.max_draft = self.traces.max_draft if self.traces is not None else len(self.alpha)
        self.draft = object() if self.max_draft else None  # ControlLoop reads this to allow drafting
        self._next_trace = {True: 0, False: 0}
        self.kv = KVPool.of_tokens(kv_tokens) if kv_tokens is not None else None
        if offload is not None and self.kv is None:
            raise ValueError("offload needs a KV pool to preempt from: give kv_tokens too")
        self.offload = offload
        self._copy_s = 0.0  # this step's host <-> device copies
        self._link_free = {"d2h": 0.0, "h2d": 0.0}  # when each direction's asynchronous copies are done
        self._restoring: list[_Replayed] = []
        self.rng, self.seed = random.Random(seed), seed  # step-time noise; acceptance draws per request
        self.now = 0.0
        self._waiting: dict[str, _Replayed] = {}
        self._rows: list[_Replayed] = []
        self._finished: dict[str, RequestResult] = {}
        self._next_id = 0
        self._pending: tuple[StepPlan, DraftBatch, dict[str, list[int]], tuple[int, int], dict[str, str]] | None = None
        self._trees: dict[str, _Tree] = {}  # the pending step's trees, by request (a tree step)
        self._joining: list[_Replayed] = []
        self._layout: list[_Replayed] = []  # the rows in the engine's batch-cache order (`_arrange`)
        self._moved = 0  # KV columns the engine's row moves copy, not yet charged to a step
        self._catchup = 0  # the pending step's draft catch-up columns (`runtime.shapes.catchup_of`)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        """An idle server waiting: the simulated clock moves on, nothing else happens."""
        self.now += max(0.0, seconds)

    # ------------------------------------------------------------ requests
    def add_request(self, prompt: Sequence[int] | int, sampling: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None, slo: SLO | None = None,
                    stream: Stream | None = None, trace: RequestTrace | None = None,
                    draws: str | None = None) -> str:  # fmt: skip
        """prompt: token ids or just a prompt length; trace: the acceptance it follows (default:
        the engine's next recorded trace of its kind, greedy or sampled); draws: the name its
        random draws are keyed by (default: its request id; a bench that serves one request
        under another id in each run keeps its draws alike). Raises `RequestError` on bad input."""
        sampling = sampling if sampling is not None else SamplingParams()
        sampling.validate()
        if slo is not None:
            slo.validate()
        if stream is not None:
            if not isinstance(stream, Stream):
                raise RequestError(f"stream must be an adactl.runtime.Stream, got {type(stream).__name__}")
            stream.validate()
        n = prompt if isinstance(prompt, int) else len(prompt)
        if n < 1 or n >= self.max_context:
            raise RequestError(f"prompt length must be in [1, {self.max_context}), got {n}")
        if self.kv is not None and self.kv.blocks_for(n + sampling.max_new_tokens) > self.kv.total_blocks:
            raise RequestError(f"{n} prompt + {sampling.max_new_tokens} new tokens need more KV than the pool's "
                               f"{self.kv.total_blocks * self.kv.block_size} tokens")  # fmt: skip
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if (
            request_id in self._waiting
            or request_id in self._finished
            or any(r.request_id == request_id for r in self._rows)
        ):
            raise RequestError(f"request id {request_id!r} is already in use")
        arrival = self.now if arrival_time is None else arrival_time
        playback = Playback(stream, arrival) if stream is not None else None
        draws_of = random.Random(f"{self.seed}:{draws or request_id}")  # a str seed hashes the same everywhere
        if trace is None and self.traces is not None:
            trace = self._trace_for(sampling.temperature <= 0)
        self._waiting[request_id] = _Replayed(request_id, n, sampling, arrival, slo, playback, draws=draws_of,
                                              uniforms={}, trace=trace)  # fmt: skip
        return request_id

    def _trace_for(self, greedy: bool) -> RequestTrace:
        """The next recorded trace of this kind (greedy or sampled; any, if none of the kind), in turn."""
        assert self.traces is not None
        kind = [t for t in self.traces.requests if t.greedy == greedy] or self.traces.requests
        i = self._next_trace[greedy]
        self._next_trace[greedy] += 1
        return kind[i % len(kind)]

    def cancel(self, request_id: str) -> bool:
        if request_id in self._waiting:
            self._finish(self._waiting.pop(request_id), "cancelled")
            return True
        for i, r in enumerate(self._rows):
            if r.request_id == request_id:
                self._finish(self._rows.pop(i), "cancelled")
                return True
        return False

    def requests(self) -> list[RequestView]:
        views = []
        for r in [*self._waiting.values(), *self._rows]:
            waiting = r.request_id in self._waiting
            status = "running" if not waiting else ("prefilling" if r.prefilled else "waiting")
            kv = "device" if status != "waiting" else "none"
            if waiting and r.offloaded:
                status, kv = "offloaded", "host"
            elif waiting and r.ready_at is not None:
                status = "restoring"
            pb = r.playback
            views.append(
                RequestView(
                    r.request_id,
                    status,
                    r.to_prefill if waiting else r.prompt_len,  # preempted: the whole context again
                    r.prefilled,
                    r.generated,
                    r.context_len,
                    r.arrival_time,
                    r.first_token_time,
                    r.sampling,
                    r.slo,
                    pb.stream if pb is not None else None,
                    pb.progress(self.now) if pb is not None else None,
                    kv,
                    r.ready_at,
                    self.kv.held.get(r.request_id, 0) if self.kv is not None else None,
                    r.lag,
                )  # fmt: skip
            )
        return views

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._rows)

    def abort_all(self) -> list[str]:
        """As `Engine.abort_all`: drop every unfinished request (no results for them; their KV
        blocks freed) and any step in progress. Returns the ids dropped."""
        reqs = [*self._waiting.values(), *self._rows]
        for r in reqs:
            self._release(r)
        self._waiting, self._rows, self._joining, self._restoring = {}, [], [], []
        self._pending, self._trees, self._copy_s = None, {}, 0.0
        self._link_free = {"d2h": 0.0, "h2d": 0.0}
        self._layout, self._moved = [], 0  # (the engine's caches are emptied: nothing moves)
        return [r.request_id for r in reqs]

    def kv_bytes(self, include_draft: bool = True) -> int:
        """0: the replay holds no caches (its KV pool's blocks are in `kv_stats`)."""
        return 0

    def pop_finished(self) -> list[RequestResult]:
        done = list(self._finished.values())
        self._finished.clear()
        return done

    # ---------------------------------------------------------------- step
    def step(self, plan: StepPlan | None = None) -> StepOutcome:
        self.draft_step(plan)
        return self.verify()

    def draft_step(self, plan: StepPlan | None = None) -> DraftBatch:
        if self._pending is not None:
            raise RuntimeError("the previous step's drafts are not verified yet: call verify() first")
        plan = plan if plan is not None else StepPlan()
        if plan.prefill_budget < 0:
            raise RequestError(f"prefill_budget must be an integer >= 0, got {plan.prefill_budget!r}")
        self._join_restored()  # (time alone decides it: not a change the plan could refuse)
        if plan.tree is not None:
            self._check_trees(plan.tree)
        self._check_moves(plan)  # everything that may refuse the plan comes before anything changes
        running = {r.request_id for r in self._rows}
        if plan.run is not None and not set(plan.run) <= running:
            raise RequestError(f"plan.run names requests that are not running: {sorted(set(plan.run) - running)[:5]}")
        if plan.admit is not None and not set(plan.admit) <= set(self._waiting):
            raise RequestError(f"plan.admit names requests that are not waiting: {sorted(set(plan.admit))[:5]}")
        run = [r for r in self._rows if plan.run is None or r.request_id in set(plan.run)]
        trees = {r.request_id: self._tree(plan, r) for r in run} if plan.tree is not None else {}  # (may refuse)
        self._move(plan)
        moved = {*plan.preempt, *plan.offload}
        run = [r for r in run if r in self._rows]  # preempted or offloaded: not this step
        # prefill: admitted waiting requests in order, within the budget and the batch size
        order = list(self._waiting) if plan.admit is None else list(plan.admit)
        # prompts part-way through first (they hold blocks; the engine's and vLLM's order)
        started = [rid for rid in order if self._waiting[rid].prefilled and not self._waiting[rid].offloaded]
        first = set(started)
        order = started + [rid for rid in order if rid not in first]
        room = self.max_batch_size - len(self._rows) - sum(r.ready_at is not None for r in self._waiting.values())
        budget = plan.prefill_budget
        emitted: dict[str, list[int]] = {}
        finished: dict[str, str] = {}
        prefill_tokens = attention = 0
        joining: list[_Replayed] = []
        self._restoring = []
        for rid in order:
            req = self._waiting[rid]
            if req.ready_at is not None or rid in moved:  # a restore in flight joins by itself; moved off: not now
                continue
            if len(joining) + len(self._restoring) >= room:
                break
            if req.offloaded:  # resumes by copying its KV back, without a prefill
                assert self.kv is not None and self.offload is not None
                if not self.kv.grow(rid, req.context_len):
                    self.kv.waits += 1
                    break
                self._copy_s += self.offload.restore(rid)
                self.kv.restores += 1
                req.offloaded = False
                self._restoring.append(req)
                continue
            if budget <= 0:
                break
            take = min(budget, req.to_prefill - req.prefilled)
            if self.kv is not None and not self.kv.grow(rid, req.to_prefill):  # its whole prompt (as the engine)
                self.kv.waits += 1  # its blocks are not free: it and everything behind it wait
                break
            attention += prefill_pairs([(req.prefilled, take)])
            req.prefilled += take
            budget -= take
            prefill_tokens += take
            if req.prefilled == req.to_prefill:
                joining.append(req)
        lens = [len(trees[r.request_id].ids) if trees else self._draft_len(plan.draft_len, r) for r in run]
        if self.kv is not None:
            run, lens = self._make_room(run, lens)
        # the engine's row order: longest draft first (trees: deepest first)
        rank = {r.request_id: (trees[r.request_id].depth, n) if trees else (n, n) for r, n in zip(run, lens)}
        run_sorted = sorted(zip(run, lens), key=lambda x: rank[x[0].request_id], reverse=True)
        run = [r for r, _ in run_sorted]
        lens = [k for _, k in run_sorted]
        self._arrange(run, lens, rank)
        self._catchup = catchup_of([r.lag for r, n in zip(run, lens) if n > 0])
        k = max(lens, default=0)
        b = len(run)
        drafted = np.arange(k)[None, :] < np.asarray(lens, dtype=np.int64).reshape(b, 1)
        tokens = torch.from_numpy(np.where(drafted, 1, -1))
        parents = None
        if trees:
            rows = np.full((b, k), -1, dtype=np.int64)
            for i, r in enumerate(run):
                rows[i, : lens[i]] = trees[r.request_id].parents
            parents = torch.from_numpy(rows)
        drafts = DraftBatch(
            request_ids=tuple(r.request_id for r in run),
            tokens=tokens,
            draft_len=torch.tensor(lens, dtype=torch.long),
            probs=torch.zeros(b, k, 1),
            context_len=torch.tensor([r.context_len for r in run], dtype=torch.long),
            greedy=torch.tensor([r.sampling.temperature <= 0 for r in run], dtype=torch.bool),
            parents=parents,
            summary=self._summary(run, lens, k, trees) if self.traces is not None else None,
        )
        self._joining = joining
        self._trees = trees
        self._pending = (plan, drafts, emitted, (prefill_tokens, attention), finished)
        return drafts

    def _arrange(self, run: list[_Replayed], lens: list[int], rank: dict[str, Any]) -> None:
        """Count the KV the engine copies moving its rows this step (`Rows.drop`, `Rows.arrange`:
        `runtime.shapes.dropping`, `arrangement`), each moved row its cache's width (the longest
        context held; holes aside): rows that left since the last step (finished, preempted,
        offloaded) have the last rows moved into their places, joined ones come last, then the
        rows take their segments [drafting rows by draft shape, longest first | decoding
        without a draft | deferred]. A profile prices the copies (`kv_moved`); a computed GPU
        profile holds them at 0."""
        here = {id(r) for r in self._rows}
        gone = {i for i, r in enumerate(self._layout) if id(r) not in here}
        if gone:
            perm = dropping(len(self._layout), gone)
            self._moved += moved_rows(perm) * max(r.context_len for r in self._layout)
            self._layout = [self._layout[i] for i in perm]
        laid = {id(r) for r in self._layout}
        self._layout += [r for r in self._rows if id(r) not in laid]
        drafting = [(r, rank[r.request_id]) for r, k in zip(run, lens) if k > 0]  # (longest first)
        keys = [key for _, key in drafting]
        groups = sorted(set(keys), key=keys.index)
        segment = {id(r): groups.index(key) for r, key in drafting}
        segment |= {id(r): len(groups) for r, k in zip(run, lens) if k == 0}
        sizes = [keys.count(key) for key in groups] + [sum(k == 0 for k in lens), len(self._layout) - len(run)]
        perm = arrangement([segment.get(id(r), len(groups) + 1) for r in self._layout], sizes)
        moves = moved_rows(perm)
        if moves:
            self._moved += moves * max(r.context_len for r in self._layout)
            self._layout = [self._layout[i] for i in perm]

    def _check_trees(self, tree: TreeSpec | Mapping[str, TreeSpec]) -> None:
        """A tree plan's specs, before anything runs: valid, and of the width the tree traces hold."""
        specs = list(tree.values()) if isinstance(tree, Mapping) else [tree]
        if isinstance(tree, Mapping) and not set(tree) <= {r.request_id for r in self._rows}:
            unknown = sorted(set(tree) - {r.request_id for r in self._rows})
            raise RequestError(f"plan.tree names requests that are not running: {unknown[:5]}")
        width = self.traces.tree_width if self.traces is not None else None
        for spec in specs:
            if not isinstance(spec, TreeSpec):
                raise RequestError(f"plan.tree must hold TreeSpecs, got {type(spec).__name__}")
            spec.validate()
            if spec.width > 1 and spec.depth > 0 and width is None:
                raise RequestError("the replay drafts trees from tree traces, and this engine has none (record them: "
                                   f"python train/record_traces.py --tree-width {spec.width})")  # fmt: skip
            if spec.width > 1 and spec.depth > 0 and spec.width != width:
                raise RequestError(f"the replay's tree traces hold width-{width} trees; plan.tree asks for width "
                                   f"{spec.width}")  # fmt: skip

    def _tree(self, plan: StepPlan, req: _Replayed) -> _Tree:
        """The tree `req` drafts this step under `plan` (its recorded nodes, from its tree trace;
        a one-wide spec is a chain, from its chain trace), clipped as the engine clips it, and
        to the depth its trace recorded (a deeper spec drafts what the recording holds)."""
        assert plan.tree is not None
        spec = plan.tree.get(req.request_id) if isinstance(plan.tree, Mapping) else plan.tree
        if spec is None:
            spec = chain_spec(self._draft_len(plan.draft_len, req))
        if spec.width > 1 and spec.depth > 0 and (req.trace is None or req.trace.tree is None
                                                  or req.trace.tree.tree_width != spec.width):  # fmt: skip
            raise RequestError(f"request {req.request_id!r} follows no width-{spec.width} tree trace (it was given "
                               "a trace without one)")  # fmt: skip
        tree = req.trace.tree if spec.width > 1 and req.trace is not None else None
        recorded = tree.tree_depth if tree is not None else self.max_draft
        depth = max(0, min(spec.depth, recorded, req.sampling.max_new_tokens - req.generated - 1,
                           self.max_context - req.context_len - 1))  # fmt: skip
        if depth == 0 or spec.max_nodes == 0:
            return _Tree(0, None, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        if tree is None:  # a chain (ordered by its spec's depth, as the engine orders rows)
            n = min(depth, spec.nodes)
            return _Tree(depth, None, np.arange(n), np.arange(n) - 1)
        ids, parents = tree.tree_draft(req.generated, depth, spec.nodes)
        return _Tree(depth, tree, ids, parents)

    def _check_moves(self, plan: StepPlan) -> None:
        """Raise `RequestError` if `plan`'s preempt, offload or restore cannot be done
        (`kv_pool.check_kv_moves`)."""
        running = {r.request_id: r.context_len for r in self._rows}
        offloaded = {rid: r.context_len for rid, r in self._waiting.items() if r.offloaded}
        restoring = sum(r.ready_at is not None for r in self._waiting.values())
        check_kv_moves(plan, running, offloaded, self.kv, self.offload,
                       self.max_batch_size - len(self._rows) - restoring)  # fmt: skip

    def _row(self, request_id: str) -> _Replayed:
        return next(r for r in self._rows if r.request_id == request_id)

    def _move(self, plan: StepPlan) -> None:
        """Apply a checked plan's preempt, offload and restore. An offload or restore is an
        asynchronous copy (TokenFlow's, beside compute): each direction one queue at the host's
        bandwidth, charged to no step; a restored request decodes from the first step after its
        copy completes. (Blocks are freed when an offload is issued: optimistic by one copy,
        milliseconds at PCIe bandwidth.)"""
        assert self.kv is not None or not (plan.preempt or plan.offload or plan.restore)
        for rid in plan.preempt:
            self._preempt(self._row(rid), offload=False)
        for rid in plan.offload:
            req = self._row(rid)
            assert self.kv is not None and self.offload is not None
            copy_s = self.offload.offload(rid, req.context_len)
            if copy_s is None:  # no host room: refused, counted; it keeps running
                self.kv.offload_refused += 1
                continue
            self._link_free["d2h"] = max(self.now, self._link_free["d2h"]) + copy_s
            req.on_host_at = self._link_free["d2h"]
            self.kv.offloads += 1
            self._park(req, offloaded=True)
        for rid in plan.restore:
            req = self._waiting[rid]
            assert self.kv is not None and self.offload is not None
            grown = self.kv.grow(rid, req.context_len + 1)
            assert grown, "checked by _check_moves"
            start = max(self.now, self._link_free["h2d"], req.on_host_at)  # (its own offload copy done first)
            self._link_free["h2d"] = start + self.offload.restore(rid)
            self.kv.restores += 1
            req.offloaded, req.ready_at = False, self._link_free["h2d"]

    def _join_restored(self) -> None:
        """Requests whose restore has completed by now decode again (after the running rows)."""
        for req in [r for r in self._waiting.values() if r.ready_at is not None and r.ready_at <= self.now]:
            del self._waiting[req.request_id]
            req.ready_at = None
            self._rows.append(req)

    def _park(self, req: _Replayed, offloaded: bool) -> None:
        """Take a running request off the device to the head of the line: with its KV in host
        memory (`offloaded`: it resumes by a restore) or without (it prefills its whole context
        again)."""
        assert self.kv is not None
        self.kv.release(req.request_id)
        self._rows.remove(req)
        req.offloaded = offloaded
        req.prefill_goal = req.context_len
        req.prefilled = req.context_len if offloaded else 0
        req.preemptions += 1
        started = {rid: r for rid, r in self._waiting.items() if r.prefilled and not r.offloaded}
        self._waiting = {**started, req.request_id: req, **self._waiting}  # behind prompts part-way through

    def _make_room(self, run: list[_Replayed], lens: list[int]) -> tuple[list[_Replayed], list[int]]:
        """Blocks for every running row's context and this step's draft (in admission order);
        where they are missing, the last-admitted running request is preempted by recompute
        (vLLM's default) until they are not. Returns the rows that still run."""
        assert self.kv is not None
        want = {r.request_id: r.context_len + n + 1 for r, n in zip(run, lens)}
        for req in list(self._rows):
            if req not in self._rows or req.request_id not in want:
                continue
            while not self.kv.grow(req.request_id, want[req.request_id]):
                victim = self._rows[-1]
                self._preempt(victim)
                if victim is req:
                    break
        keep = [i for i, r in enumerate(run) if r in self._rows]
        return [run[i] for i in keep], [lens[i] for i in keep]

    def _preempt(self, req: _Replayed, offload: bool = True) -> None:
        """Take `req`'s KV: to host memory if `offload` and host memory has room for it (a
        synchronous copy, charged to this step, as vLLM v0's swap; it resumes by a restore),
        else dropped (it prefills its whole context again). Either way it waits at the head of
        the line."""
        assert self.kv is not None
        copy_s = self.offload.offload(req.request_id, req.context_len) if self.offload is not None and offload else None
        if copy_s is not None:
            self._copy_s += copy_s
            self.kv.offloads += 1
        else:
            self.kv.recomputes += 1
        self._park(req, offloaded=copy_s is not None)

    def kv_state(self) -> KVState | None:
        """The KV pool before the next step, for memory-aware schedulers (None without a pool)."""
        return pool_state(self.kv, self.offload) if self.kv is not None else None

    def kv_stats(self) -> dict[str, float]:
        """The KV pool's blocks and what it made wait, recompute, offload and restore, and the
        bytes copied to and from host memory (empty without a pool)."""
        return pool_stats(self.kv, self.offload) if self.kv is not None else {}

    @staticmethod
    def _summary(run: list[_Replayed], lens: list[int], k: int, trees: dict[str, _Tree]) -> DraftSummary:
        """The recorded signals of each row's draft at its output position (0 past its draft):
        a chain's positions, a tree's nodes."""
        s = np.zeros((len(run), k, 5), dtype=np.float32)  # SIGNALS: token_prob, entropy, margin, companion, overlap
        for i, (r, n) in enumerate(zip(run, lens)):
            tree = trees[r.request_id] if trees else None
            if n and tree is not None and tree.trace is not None:
                s[i, :n] = tree.trace.signals[tree.trace.row(r.generated)][tree.ids]
            elif n and r.trace is not None:
                s[i, :n] = r.trace.signals[r.trace.row(r.generated), :n]
        t = torch.from_numpy(s).permute(2, 0, 1)
        return DraftSummary(t[0], t[1], t[2], t[3], t[4])

    def _accepted(self, req: _Replayed, cut: int) -> list[int]:
        """The pending draft's accepted nodes (a chain's first a) when `cut` are verified."""
        tree = self._trees.get(req.request_id)
        if tree is not None and tree.trace is not None:
            return req.tree_path(tree.ids, tree.parents, cut)
        return list(range(req.accepted(self.alpha, cut)))

    def verdict(self) -> torch.Tensor:
        """[B] draft tokens of each pending row the target would accept if all were verified
        (the oracle's peek; off the clock). A tree batch: `verdict_path`."""
        drafts = self._pending_drafts()
        rows = {r.request_id: r for r in self._rows}
        return torch.tensor([len(self._accepted(rows[rid], int(n))) for rid, n in
                             zip(drafts.request_ids, drafts.draft_len.tolist())], dtype=torch.long)  # fmt: skip

    def lookahead(self, request_ids: Sequence[str], k: int) -> torch.Tensor:
        """[R] draft tokens the target would accept if each running request drafted k now (its
        length limit applied), before anything is drafted: the per-request oracle's hindsight
        (off the clock; the same draws the step will use)."""
        rows = {r.request_id: r for r in self._rows}
        return torch.tensor([rows[rid].accepted(self.alpha, self._draft_len(k, rows[rid])) if rid in rows else 0
                             for rid in request_ids], dtype=torch.long)  # fmt: skip

    def hindsight(self, request_ids: Sequence[str], k: int) -> torch.Tensor:
        """[R, k] each running request's conditional acceptance by draft position, averaged over
        its whole trace (the flat alpha without one): what the per-request bound knows."""
        rows = {r.request_id: r for r in self._rows}
        out = torch.zeros(len(request_ids), k)
        for i, rid in enumerate(request_ids):
            req = rows.get(rid)
            mean = req.trace.ratio.mean(0) if req is not None and req.trace is not None else np.asarray(self.alpha)
            n = min(k, len(mean))
            out[i, :n] = torch.from_numpy(np.asarray(mean[:n], dtype=np.float32))
        return out

    def verdict_path(self) -> torch.Tensor:
        """[B, K] bool: the nodes of each pending row's draft the target would accept if all
        were verified (the oracle's peek at a tree; off the clock)."""
        drafts = self._pending_drafts()
        rows = {r.request_id: r for r in self._rows}
        paths = [self._accepted(rows[rid], n) for rid, n in zip(drafts.request_ids, drafts.draft_len.tolist())]
        return _path_mask(paths, drafts.tokens.shape)

    def _pending_drafts(self) -> DraftBatch:
        if self._pending is None:
            raise RuntimeError("no drafts pending: call draft_step() first")
        return self._pending[1]

    def _draft_len(self, draft_len: int | Mapping[str, int], req: _Replayed) -> int:
        k = draft_len.get(req.request_id, 0) if isinstance(draft_len, Mapping) else int(draft_len)
        k = min(k, int(req.trace.ratio.shape[1]) if req.trace is not None else len(self.alpha))
        return max(0, min(k, req.sampling.max_new_tokens - req.generated - 1))

    def verify(self, verify_len: Sequence[int] | torch.Tensor | None = None) -> StepOutcome:
        if self._pending is None:
            raise RuntimeError("no drafts to verify: call draft_step() (or step()) first")
        _, drafts, emitted, (prefill_tokens, attention), finished = self._pending
        cut = drafts.draft_len.clone() if verify_len is None else torch.as_tensor(verify_len).long().flatten()
        if cut.shape[0] != len(drafts.request_ids) or bool(((cut < 0) | (cut > drafts.draft_len)).any()):
            raise RequestError(f"verify_len must give each of the {len(drafts.request_ids)} rows 0..its draft length")

        fed, forwards = draft_work(drafts.draft_len, drafts.parents)
        context, span = context_of(drafts.context_len)
        moved, self._moved = self._moved, 0
        catchup, self._catchup = self._catchup, 0
        shape = StepShape.of_lengths(cut, fed, prefill_tokens, context, attention, forwards, span, moved, catchup)
        parts = (
            self.step_time.predict_parts([shape])[0]
            if hasattr(self.step_time, "predict_parts")
            else [0.0, 0.0, float(self.step_time.predict([shape])[0])]
        )
        factor = math.exp(self.rng.gauss(0.0, self.noise)) if self.noise > 0 else 1.0
        prefill_s, draft_s, verify_s = (float(x) * factor for x in parts)
        prefill_s, self._copy_s = prefill_s + self._copy_s, 0.0  # host <-> device KV copies: no noise
        prefilled = self.now + prefill_s  # where the engine samples a completed prompt's first token
        self.now += prefill_s + draft_s + verify_s
        rows = {r.request_id: r for r in self._rows}
        paths = [self._accepted(rows[rid], c) for rid, c in zip(drafts.request_ids, cut.tolist())]
        for rid, nodes, n in zip(drafts.request_ids, paths, drafts.draft_len.tolist()):
            emitted[rid] = self._emit(rows[rid], len(nodes) + 1, finished)
            req = rows[rid]  # what the draft has not read: the engine's `Proposer.update`
            if n == 0:  # (a plain row: every token it emits)
                req.lag += len(emitted[rid])
            else:  # a chain: its last token (and the last draft token, where all n were accepted); a tree: its path
                req.lag = len(nodes) + 1 if drafts.parents is not None else 1 + (len(nodes) == n)
        accepted = torch.tensor([len(nodes) for nodes in paths], dtype=torch.long)
        path = _path_mask(paths, drafts.tokens.shape) if drafts.parents is not None else None
        for req in self._joining:  # prompts completed this step: their first token (a preempted one's next)
            del self._waiting[req.request_id]
            if req.first_token_time is None:
                req.first_token_time = prefilled
            self._rows.append(req)
            req.lag = 1
            emitted[req.request_id] = self._emit(req, 1, finished, at=prefilled)
        for req in self._restoring:  # KV back from host memory: it decodes from the next step
            del self._waiting[req.request_id]
            self._rows.append(req)
        self._restoring = []
        self._rows = [r for r in self._rows if r.request_id not in finished]
        pending = [r.ready_at for r in self._waiting.values() if r.ready_at is not None]
        if pending and not self._rows and not drafts.request_ids and not prefill_tokens:
            self.now = max(self.now, min(pending))  # nothing else to do: an idle server waits for the copy
        self._join_restored()
        self._pending = None
        self._trees = {}
        return StepOutcome(
            request_ids=drafts.request_ids, drafted=drafts.draft_len, verified=cut, accepted=accepted,
            emitted=emitted, finished=finished, prefill_tokens=prefill_tokens, prefill_s=prefill_s,
            draft_s=draft_s, verify_s=verify_s, total_s=prefill_s + draft_s + verify_s, prefill_attention=attention,
            path=path, moved_tokens=moved, catchup_tokens=catchup,
        )  # fmt: skip

    def _emit(self, req: _Replayed, n: int, finished: dict[str, str], at: float | None = None) -> list[int]:
        """Emit n tokens (fewer where the request ends), its reader told at `at` (default: now)."""
        eos = req.trace.length if req.trace is not None and req.sampling.stop_on_eos else None
        n = min(n, req.sampling.max_new_tokens - req.generated, self.max_context - req.context_len)
        if eos is not None:
            n = min(n, eos - req.generated)
        req.generated += n
        ended = eos is not None and req.generated >= eos  # where the recorded request ended by EOS
        done = ended or req.generated >= req.sampling.max_new_tokens or req.context_len >= self.max_context
        if req.playback is not None:
            units = replayed_units(req.playback.stream.unit, req.generated, done)
            req.playback.produce(units, req.generated, self.now if at is None else at, done)
        if done:
            reason = "eos" if ended else "length" if req.generated >= req.sampling.max_new_tokens else "context"
            finished[req.request_id] = reason
            self._finish(req, finished[req.request_id])
        return [1] * n

    def _release(self, req: _Replayed) -> None:
        """Free what `req` holds of the KV pool and of host memory."""
        if self.kv is not None:
            self.kv.release(req.request_id)
        if self.offload is not None:
            self.offload.drop(req.request_id)

    def _finish(self, req: _Replayed, reason: str) -> None:
        self._release(req)
        units = misses = read_end = None
        if req.playback is not None:
            units, misses = req.playback.settle()
            read_end = req.playback.read_end
        self._finished[req.request_id] = RequestResult(
            req.request_id, [0] * req.prompt_len, [1] * req.generated, reason, req.arrival_time,
            req.first_token_time, self.now, units, misses, read_end,
        )  # fmt: skip
