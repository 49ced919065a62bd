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

Non-goals: no threads, no tokenizer logic beyond turning a prompt into ids, no scheduling
policy (the plan says what runs), no knowledge of controllers.

Row order: the decode batch is ordered [drafting rows, longest draft first | running rows
that do not draft | deferred rows], so every forward runs on a prefix of the rows and rows
that do not take part cost nothing.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from .feature_draft import is_feature_draft
from .kv import BatchKV, KVConfig
from .models import chat_ids, output_vocab_size
from .stream import Playback, Stream, count_units
from .tree import RowTree, chain_spec
from .types import (
    SLO,
    DraftBatch,
    RequestError,
    RequestResult,
    RequestView,
    SamplingParams,
    StepOutcome,
    StepPlan,
    TreeSpec,
)
from .verify import Verifier, process_logits, sample, verify_chains, verify_trees

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]] | torch.Tensor


@dataclass(frozen=True)
class EngineConfig:
    """Engine-wide settings (everything per request lives in `SamplingParams`)."""

    max_batch_size: int = 256
    """Requests running or prefilling at once, at most (vLLM's max_num_seqs)."""
    seed: int = 0
    """Seed of the engine's sampling generator."""
    kv: KVConfig = field(default_factory=KVConfig)
    """KV cache growth and compaction policy."""


@dataclass
class _Request:
    """Engine-internal state of one request."""

    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    arrival_time: float
    output: list[int] = field(default_factory=list)
    prefilled: int = 0
    first_token_time: float | None = None
    target_pending: list[int] = field(default_factory=list)  # emitted, not yet in the target cache
    draft_pending: list[int] = field(default_factory=list)  # emitted, not yet in the draft cache
    # feature drafts only: the target feature of the position before each draft_pending token,
    # and the target feature of the last prompt token prefilled so far
    draft_features: list[torch.Tensor] = field(default_factory=list)
    last_feature: torch.Tensor | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None  # the request's own draws, when it has a seed
    slo: SLO | None = None
    playback: Playback | None = None  # the consumer's account, for streamed requests

    @property
    def context_len(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass
class _Inflight:
    """State kept between `draft()` and `verify()`."""

    rows: int  # decode rows (a prefix of the batch)
    drafting: int  # rows that drafted (a prefix of the decode rows)
    draft_len: torch.Tensor  # [rows] long
    tokens: torch.Tensor  # [rows, K] long, -1 padded
    probs: torch.Tensor  # [rows, K, V] float32
    emitted: dict[str, list[int]]
    finished: dict[str, str]
    joining: list[_Request]
    prefill_tokens: int
    prefill_s: float
    draft_s: float
    target_features: torch.Tensor | None = None  # [rows, T, H], feature drafts only
    parents: torch.Tensor | None = None  # [rows, K] long, tree steps only (DraftBatch.parents)
    path: torch.Tensor | None = None  # [rows, K] bool, tree steps only: accepted nodes


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
        self.tree_verifier = tree_verifier
        self.target = target.eval()
        self.draft = draft.eval() if draft is not None else None
        self.tokenizer = tokenizer
        self.verifier = verifier
        self.device = next(target.parameters()).device
        self.vocab_size = output_vocab_size(target)
        # a feature draft (EAGLE-style) reads the target's last hidden state and proposes
        # tokens from a reduced vocabulary; a plain draft is any causal LM on the same tokenizer
        self.feature_draft = draft is not None and is_feature_draft(draft)
        self._draft_vocab: torch.Tensor | None = None  # a feature draft's token ids, [N]
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
            if self.feature_draft:
                self._draft_vocab = torch.as_tensor(draft.vocab_ids).cpu()
        # a draft run with its companion (Speculative Verification) also reports the
        # companion's distribution at every draft position, over its own vocabulary ids
        comp = getattr(draft, "companion_vocab_ids", None)
        self._companion_vocab: torch.Tensor | None = torch.as_tensor(comp).cpu() if comp is not None else None
        text_config = target.config.get_text_config()
        self.max_context = int(getattr(text_config, "max_position_embeddings", 1 << 30))
        self.eos_ids = _eos_ids(target, tokenizer)
        self._target_kv = BatchKV(text_config.num_hidden_layers, self.device, self.config.kv)
        self._draft_kv = (
            BatchKV(
                self.draft.get_text_config().num_hidden_layers
                if self.feature_draft
                else self.draft.config.get_text_config().num_hidden_layers,
                self.device,
                self.config.kv,
            )
            if self.draft is not None
            else None
        )
        # prompts being prefilled live in caches of their own, batched; a finished prompt's
        # row moves to the batch caches (or the whole prefill cache is adopted, when no
        # request is running and every prefill row is done)
        self._prefill_kv = self._new_kv(self._target_kv)
        self._prefill_draft_kv = self._new_kv(self._draft_kv) if self._draft_kv is not None else None
        self._prefilling: list[_Request] = []  # in prefill cache row order
        self._rows: list[_Request] = []  # running requests, in cache row order
        self._waiting: dict[str, _Request] = {}  # arrival order
        self._finished: dict[str, RequestResult] = {}
        self._inflight: _Inflight | None = None
        self._next_id = 0
        # sampling runs on the CPU (one [B, V] row per token), so one CPU generator serves any device
        self._generator = torch.Generator().manual_seed(self.config.seed)

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
        if slo is not None:
            if not isinstance(slo, SLO):
                raise RequestError(f"slo must be an adactl.runtime.SLO, got {type(slo).__name__}")
            slo.validate()
        if stream is not None:
            if not isinstance(stream, Stream):
                raise RequestError(f"stream must be an adactl.runtime.Stream, got {type(stream).__name__}")
            stream.validate()
            if stream.unit != "token":
                self._need_tokenizer(f"a stream read in {stream.unit}s")
        ids = self._prompt_ids(prompt)
        if not ids:
            raise RequestError("prompt is empty: give at least one token")
        if len(ids) >= self.max_context:
            raise RequestError(
                f"prompt has {len(ids)} tokens but the model's context holds {self.max_context}, "
                "leaving no room to generate: shorten the prompt"
            )
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt holds token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        in_use = request_id in self._waiting or request_id in self._finished
        if in_use or any(r.request_id == request_id for r in self._rows):
            raise RequestError(f"request id {request_id!r} is already in use")
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        req = _Request(request_id, ids, sampling, arrival, slo=slo)
        if stream is not None:
            req.playback = Playback(stream, arrival)
        if sampling.seed is not None:
            req.generator = torch.Generator().manual_seed(sampling.seed)
        self._waiting[request_id] = req
        return request_id

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise RequestError(f"a prompt tensor must be 1-D token ids, got shape {tuple(prompt.shape)}")
            return [int(t) for t in prompt.tolist()]
        if isinstance(prompt, str):
            return list(self._need_tokenizer("a text prompt")(prompt)["input_ids"])
        items: list[Any] = list(prompt)
        if items and all(isinstance(m, Mapping) for m in items):
            for m in items:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise RequestError(f"each chat message needs string 'role' and 'content', got {m!r}")
            return chat_ids(self._need_tokenizer("chat messages"), items)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            raise RequestError("a prompt must be a string, chat messages, or a sequence of integer token ids")
        return [int(t) for t in items]

    def _need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise RequestError(f"{what} needs a tokenizer, but this engine has none: pass token ids")
        return self.tokenizer

    @torch.inference_mode()
    def cancel(self, request_id: str) -> bool:
        """Stop a request now (or at the end of the step in flight); frees its KV cache.

        Returns False if no unfinished request has that id.
        """
        if request_id in self._waiting:
            req = self._waiting.pop(request_id)
            if req in self._prefilling:
                self._drop_prefill_rows({self._prefilling.index(req)})
            self._finish(req, "cancelled")
            return True
        for i, req in enumerate(self._rows):
            if req.request_id == request_id:
                if self._inflight is not None:
                    req.cancelled = True
                else:
                    self._finish(req, "cancelled")
                    self._drop_rows({i})
                return True
        joining = self._inflight.joining if self._inflight is not None else []
        for req in joining:  # emitted its first token in the step in flight
            if req.request_id == request_id and req.finish_reason is None:
                req.cancelled = True
                return True
        return False

    def abort_all(self) -> list[str]:
        """Drop every unfinished request and start from empty caches: for a server whose step
        raised midway, leaving the engine in an unknown state. Returns the ids dropped (no
        results are reported for them); finished results not yet popped are kept."""
        joining = self._inflight.joining if self._inflight is not None else []
        reqs = [*self._waiting.values(), *self._rows, *joining]
        dropped = list(dict.fromkeys(r.request_id for r in reqs if r.request_id not in self._finished))
        self._target_kv, self._prefill_kv = self._new_kv(self._target_kv), self._new_kv(self._prefill_kv)
        if self._draft_kv is not None and self._prefill_draft_kv is not None:
            self._draft_kv, self._prefill_draft_kv = self._new_kv(self._draft_kv), self._new_kv(self._prefill_draft_kv)
        self._prefilling, self._rows, self._waiting, self._inflight = [], [], {}, None
        return dropped

    def requests(self) -> list[RequestView]:
        """Unfinished requests: waiting or prefilling (arrival order), then running (row order)."""
        views = []
        now = time.perf_counter()
        for req in list(self._waiting.values()) + self._rows:
            status = "running" if req.first_token_time is not None else ("prefilling" if req.prefilled else "waiting")
            views.append(
                RequestView(
                    req.request_id,
                    status,
                    len(req.prompt),
                    req.prefilled,
                    len(req.output),
                    req.context_len,
                    req.arrival_time,
                    req.first_token_time,
                    req.sampling,
                    req.slo,
                    req.playback.stream if req.playback is not None else None,
                    req.playback.progress(now) if req.playback is not None else None,
                )
            )
        return views

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._rows)

    def pop_finished(self) -> list[RequestResult]:
        """Finished requests since the last call (each is returned once)."""
        done = list(self._finished.values())
        self._finished.clear()
        return done

    def kv_bytes(self, include_draft: bool = True) -> int:
        """Bytes held by KV caches: the batch and prefill caches of the target (and the draft's)."""
        total = self._target_kv.nbytes() + self._prefill_kv.nbytes()
        if include_draft and self._draft_kv is not None and self._prefill_draft_kv is not None:
            total += self._draft_kv.nbytes() + self._prefill_draft_kv.nbytes()
        return total

    def cached_tokens(self) -> int:
        """Real tokens held in the target's batch cache."""
        return self._target_kv.cached_tokens()

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
        run_ids, admit = self._check_plan(plan)
        t0 = self._now()
        emitted: dict[str, list[int]] = {}
        finished: dict[str, str] = {}
        joining, prefill_tokens = self._prefill(plan.prefill_budget, admit, emitted, finished)
        t1 = self._now()

        running = [r for r in self._rows if r.request_id in run_ids]
        specs = self._tree_specs(running, plan) if plan.tree is not None else None
        if specs is not None:
            # trees: rows still expanding at each level must be a prefix, so deepest first
            lens = {rid: spec.max_nodes for rid, spec in specs.items()}
            key = {rid: (spec.depth, spec.max_nodes) for rid, spec in specs.items()}
        else:
            lens = {r.request_id: self._draft_len(r, plan.draft_len) for r in running}
            key = {rid: (k, k) for rid, k in lens.items()}
        drafting = sorted((r for r in running if lens[r.request_id] > 0), key=lambda r: key[r.request_id], reverse=True)
        plain = [r for r in running if lens[r.request_id] == 0]
        deferred = [r for r in self._rows if r.request_id not in run_ids]
        by_key = [list(g) for _, g in itertools.groupby(drafting, key=lambda r: key[r.request_id])]
        self._arrange([*by_key, plain, deferred])
        n_rows, n_draft = len(drafting) + len(plain), len(drafting)
        draft_len = torch.tensor([lens[r.request_id] for r in self._rows[:n_rows]], dtype=torch.long)
        parents = None
        if specs is not None:
            tree_specs = [specs[r.request_id] for r in drafting]
            tokens, probs, parents = self._draft_trees(tree_specs, n_rows)
            comp_probs = None
            draft_len = (tokens >= 0).sum(1)  # a tree may come out smaller than its spec
        else:
            tokens, probs, comp_probs = self._draft(n_draft, draft_len[:n_draft], n_rows)
        t2 = self._now()
        self._inflight = _Inflight(
            n_rows, n_draft, draft_len, tokens, probs, emitted, finished, joining, prefill_tokens, t1 - t0, t2 - t1,
            parents=parents,
        )  # fmt: skip
        rows = self._rows[:n_rows]
        return DraftBatch(
            request_ids=tuple(r.request_id for r in rows),
            tokens=tokens,
            draft_len=draft_len,
            probs=probs,
            context_len=torch.tensor([r.context_len for r in rows], dtype=torch.long),
            greedy=torch.tensor([r.sampling.temperature <= 0 for r in rows], dtype=torch.bool),
            companion_probs=comp_probs,
            support=self._draft_vocab,
            parents=parents,
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
        cut = self._check_cut(verify_len, fl)
        t0 = self._now()
        rows = self._rows[: fl.rows]
        accepted = torch.zeros(fl.rows, dtype=torch.long)
        if fl.rows:
            accepted, next_tokens = self._verify(rows, fl, cut)
            self._emit(rows, fl, accepted, next_tokens)
        done = {i for i, r in enumerate(self._rows) if r.finish_reason is not None or r.cancelled}
        for i in sorted(done):
            req = self._rows[i]
            reason = req.finish_reason or "cancelled"
            self._finish(req, reason)
            fl.finished[req.request_id] = reason
        self._drop_rows(done)
        for req in fl.joining:
            if req.cancelled:
                self._finish(req, "cancelled")
                fl.finished[req.request_id] = "cancelled"
        self._drop_prefill_rows({i for i, r in enumerate(self._prefilling) if r.cancelled})
        self._join([r for r in fl.joining if not r.cancelled])
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
            prefill_s=fl.prefill_s,
            draft_s=fl.draft_s,
            verify_s=verify_s,
            total_s=fl.prefill_s + fl.draft_s + verify_s,
            path=fl.path,
        )

    @torch.inference_mode()
    def peek_target(self) -> torch.Tensor:
        """The target's processed distributions at every position of the pending drafts,
        [B, K + 1, V] (position j: after the context and draft tokens 0..j-1; for a tree,
        position j + 1: after node j and its ancestors), computed and then
        forgotten: the caches are as they were, and the step's randomness is untouched.

        For oracles and analysis only (it costs one full verify forward): what a controller
        that knew the target's verdict in advance would see. Call between `draft_step` and
        `verify`.
        """
        fl = self._inflight
        if fl is None:
            raise RuntimeError("no drafts pending: call draft_step() first")
        rows = self._rows[: fl.rows]
        t = fl.tokens.shape[1] + 1
        if not rows:
            return torch.zeros(0, t, self.vocab_size)
        ids = torch.zeros(fl.rows, t, dtype=torch.long)
        ids[:, 0] = torch.tensor([r.target_pending[-1] for r in rows])
        ids[:, 1:] = fl.tokens.clamp(min=0)
        valid = torch.arange(t)[None, :] <= fl.draft_len[:, None]
        parents = _slot_parents(fl.parents, t).to(self.device) if fl.parents is not None else None
        out = self._target_kv.forward(self.target, ids.to(self.device), valid.to(self.device), parents=parents)
        self._target_kv.keep_last(torch.zeros(fl.rows, t, dtype=torch.bool, device=self.device))
        temp, top_p, _ = self._sampling_tensors(rows)
        return process_logits(out.logits.float(), temp, top_p).cpu()

    # ----------------------------------------------------------------- phases
    def _check_plan(self, plan: StepPlan) -> tuple[set[str], list[_Request]]:
        if not isinstance(plan.prefill_budget, int) or plan.prefill_budget < 0:
            raise RequestError(f"prefill_budget must be an integer >= 0, got {plan.prefill_budget!r}")
        lens = plan.draft_len.values() if isinstance(plan.draft_len, Mapping) else [plan.draft_len]
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in lens):
            raise RequestError(f"draft lengths must be integers >= 0, got {plan.draft_len!r}")
        running = {r.request_id for r in self._rows}
        if plan.tree is not None:
            trees = plan.tree.values() if isinstance(plan.tree, Mapping) else [plan.tree]
            for spec in trees:
                if not isinstance(spec, TreeSpec):
                    raise RequestError(f"plan.tree must hold adactl.runtime.TreeSpec, got {type(spec).__name__}")
                spec.validate()
            if isinstance(plan.tree, Mapping) and not set(plan.tree) <= running:
                extra = sorted(set(plan.tree) - running)[:5]
                raise RequestError(f"plan.tree names requests that are not running: {extra}")
        run_ids = running if plan.run is None else set(plan.run)
        if not run_ids <= running:
            raise RequestError(f"plan.run names requests that are not running: {sorted(run_ids - running)[:5]}")
        if plan.admit is None:
            return run_ids, list(self._waiting.values())
        unknown = [r for r in plan.admit if r not in self._waiting]
        if unknown:
            raise RequestError(f"plan.admit names requests that are not waiting: {unknown[:5]}")
        return run_ids, [self._waiting[r] for r in plan.admit]

    def _draft_len(self, req: _Request, spec: int | Mapping[str, int]) -> int:
        if self.draft is None:
            return 0
        k = spec.get(req.request_id, 0) if isinstance(spec, Mapping) else spec
        room = min(req.sampling.max_new_tokens - len(req.output), self.max_context - req.context_len)
        return max(0, min(k, room - 1))  # a step emits at most k + 1 tokens

    def _prefill(
        self, budget: int, admit: list[_Request], emitted: dict[str, list[int]], finished: dict[str, str]
    ) -> tuple[list[_Request], int]:
        """Compute up to `budget` prompt tokens; requests whose prompt completes emit their first token."""
        chunks: list[tuple[_Request, int]] = []
        used = 0
        active = len(self._rows) + len(self._prefilling)
        for req in admit:
            if used >= budget:
                break
            if req.prefilled == 0:
                if active >= self.config.max_batch_size:
                    continue
                active += 1
            size = min(len(req.prompt) - req.prefilled, budget - used)
            chunks.append((req, size))
            used += size
        if not chunks:
            return [], 0
        self._start_prefill([r for r, _ in chunks if r.prefilled == 0])
        # participants first, longest chunk first, so each group below is a contiguous row range
        chunks.sort(key=lambda c: -c[1])
        order = [r for r, _ in chunks] + [r for r in self._prefilling if all(r is not c for c, _ in chunks)]
        self._permute_prefill([self._prefilling.index(r) for r in order])
        joining: list[_Request] = []
        row = 0
        for group in _length_groups([size for _, size in chunks]):
            members = chunks[row : row + len(group)]
            logits = self._prefill_group(members, row)
            row += len(group)
            for i, (req, _) in enumerate(members):
                if req.prefilled == len(req.prompt):
                    self._first_token(req, logits[i : i + 1], emitted, finished, joining)
        # rows of requests done at their first token go only now: the groups used row offsets
        self._drop_prefill_rows({i for i, r in enumerate(self._prefilling) if r.finish_reason is not None})
        return joining, used

    def _start_prefill(self, new: list[_Request]) -> None:
        if not new:
            return
        for kv in (self._prefill_kv, self._prefill_draft_kv):
            if kv is not None:
                kv.reserve_rows(kv.n_rows + len(new))
                kv.new_rows(len(new))
        self._prefilling += new

    def _prefill_group(self, members: list[tuple[_Request, int]], first_row: int) -> torch.Tensor:
        """One forward over prompt chunks of similar length, left-padded so that the last
        column is every row's last token; returns those logits [n, V]."""
        width = max(size for _, size in members)
        ids = torch.zeros(len(members), width, dtype=torch.long)
        valid = torch.zeros(len(members), width, dtype=torch.bool)
        for i, (req, size) in enumerate(members):
            ids[i, width - size :] = torch.tensor(req.prompt[req.prefilled : req.prefilled + size])
            valid[i, width - size :] = True
            req.prefilled += size
        ids, valid = ids.to(self.device), valid.to(self.device)
        extra: dict[str, Any] = {"output_hidden_states": True} if self.feature_draft else {}
        out = self._prefill_kv.forward(self.target, ids, valid, logits_to_keep=1, first_row=first_row, **extra)
        if self._prefill_draft_kv is not None:
            assert self.draft is not None
            extra = {"features": self._prefill_features(members, out.hidden_states[-1])} if self.feature_draft else {}
            self._prefill_draft_kv.forward(self.draft, ids, valid, logits_to_keep=1, first_row=first_row, **extra)
        return out.logits[:, -1]

    def _prefill_features(self, members: list[tuple[_Request, int]], hidden: torch.Tensor) -> torch.Tensor:
        """Feature-draft inputs for a left-padded prefill chunk: each token is paired with the
        target feature of the position before it (the previous chunk's last, or zeros at the
        prompt's start). Updates each request's last feature."""
        width = hidden.shape[1]
        feats = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
        for i, (req, size) in enumerate(members):
            if req.last_feature is not None:
                feats[i, width - size] = req.last_feature
            req.last_feature = hidden[i, -1].clone()
        return feats

    def _first_token(
        self,
        req: _Request,
        logits: torch.Tensor,
        emitted: dict[str, list[int]],
        finished: dict[str, str],
        joining: list[_Request],
    ) -> None:
        del self._waiting[req.request_id]
        temp, top_p, greedy = self._sampling_tensors([req])
        u = self._uniforms([req], [1], 1)[:, 0]
        token = int(sample(process_logits(logits.cpu(), temp, top_p), greedy, u)[0])
        req.first_token_time = self._now()
        emitted[req.request_id] = self._append_output(req, [token])
        if req.finish_reason is not None:
            finished[req.request_id] = req.finish_reason
            self._finish(req, req.finish_reason)
        else:
            req.target_pending = [token]
            req.draft_pending = [token]
            if self.feature_draft:
                assert req.last_feature is not None
                req.draft_features, req.last_feature = [req.last_feature], None
            joining.append(req)

    def _draft(self, n: int, lens: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Draft `lens[i]` tokens for each of the first n rows (sorted by length, longest first).

        Returns, for all `n_rows` decode rows, tokens [n_rows, K] (-1 where nothing was
        drafted), the processed draft distributions [n_rows, K, V] (0 there) and, with a
        companion, the companion's distributions at the same positions [n_rows, K, V] (else None).
        """
        k = int(lens.max()) if n else 0
        tokens = torch.full((n_rows, k), -1, dtype=torch.long)
        probs = torch.zeros(n_rows, k, self.vocab_size)
        comp_probs = torch.zeros(n_rows, k, self.vocab_size) if self._companion_vocab is not None else None
        if n == 0:
            return tokens, probs, comp_probs
        assert self.draft is not None and self._draft_kv is not None
        rows = self._rows[:n]
        temp, top_p, greedy = self._sampling_tensors(rows)
        out = self._draft_catch_up(rows)
        last = out.logits[:, -1]  # [n, V], or [n, N] over the feature draft's vocabulary
        feature = out.hidden_states[:, -1] if self.feature_draft else None  # [n, H]
        comp_last = out.companion_logits[:, -1] if comp_probs is not None else None  # [n, N_c]
        extra: dict[str, Any] = {}
        for j in range(k):
            m = int((lens > j).sum())  # rows still drafting: a prefix, since rows are sorted
            if j > 0:
                ids = tokens[:m, j - 1 : j].to(self.device)
                if feature is not None:
                    extra["features"] = feature[:m, None]
                out = self._draft_kv.forward(self.draft, ids, torch.ones_like(ids, dtype=torch.bool), **extra)
                last = out.logits[:, -1]
                feature = out.hidden_states[:, -1] if self.feature_draft else None
                comp_last = out.companion_logits[:, -1] if comp_probs is not None else None
            q = process_logits(last[:m], temp[:m], top_p[:m]).cpu()
            if comp_probs is not None and comp_last is not None and self._companion_vocab is not None:
                comp_probs[:m, j, self._companion_vocab] = process_logits(comp_last[:m], temp[:m], top_p[:m]).cpu()
            picked = sample(q, greedy[:m], self._uniforms(rows[:m], [1] * m, 1)[:, 0]).cpu()
            if self._draft_vocab is not None:  # back to target token ids
                tokens[:m, j] = self._draft_vocab[picked]
                probs[:m, j, self._draft_vocab] = q
            else:
                tokens[:m, j] = picked
                probs[:m, j] = q
        return tokens, probs, comp_probs

    def _tree_specs(self, running: list[_Request], plan: StepPlan) -> dict[str, TreeSpec]:
        """Each running request's tree this step (chains of `draft_len` for requests the plan
        gives no tree), clipped to what the request can still emit."""
        specs = {}
        for r in running:
            spec = plan.tree.get(r.request_id) if isinstance(plan.tree, Mapping) else plan.tree
            if spec is None:
                spec = chain_spec(self._draft_len(r, plan.draft_len))
            room = self._draft_len(r, spec.depth)  # a step emits at most depth + 1 tokens
            if self.draft is None or room == 0 or spec.max_nodes == 0:
                spec = chain_spec(0)
            elif room < spec.depth:
                spec = TreeSpec(depth=room, width=spec.width, nodes=spec.nodes)
            specs[r.request_id] = spec
        return specs

    def _draft_trees(self, specs: list[TreeSpec], n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grow a token tree (`adactl.runtime.tree`) for each of the first len(specs) rows
        (sorted deepest first). Level by level, the nodes to expand are fed to the draft
        model in one forward; each sees its row's context and its own ancestors (cached by
        earlier levels), at position context + depth. The levels are scratch: once the tree
        is built they leave the draft cache, and the accepted path is fed again next step.

        Returns, for all `n_rows` decode rows, tokens [n_rows, K] (-1 past a row's nodes),
        the distribution each node was drawn from [n_rows, K, V] and parents [n_rows, K]."""
        n = len(specs)
        rows = self._rows[:n]
        trees = [RowTree(spec, r.sampling.temperature <= 0) for spec, r in zip(specs, rows)]
        hidden: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]  # feature drafts: g at each expanded node
        if n:
            assert self.draft is not None and self._draft_kv is not None
            kv = self._draft_kv
            temp, top_p, _ = self._sampling_tensors(rows)
            out = self._draft_catch_up(rows)
            q = process_logits(out.logits[:, -1], temp, top_p).cpu()  # [n, N']
            root = out.hidden_states[:, -1] if self.feature_draft else None  # [n, H]
            width = max(s.width for s in specs)
            u = self._uniforms(rows, [s.width for s in specs], width)
            for i, tree in enumerate(trees):
                tree.propose(-1, q[i], u[i])
            start = kv.used_cols(0, n)  # columns from here on are this step's scratch
            context_len = kv.row_lengths()[:n].clone()
            for level in range(max(s.depth for s in specs) - 1):
                m = sum(1 for s in specs if s.depth > level + 1)  # rows still growing: a prefix
                fronts = [trees[i].frontier(level) for i in range(m)]
                w = max(len(f) for f in fronts)
                c = kv.next_col(0, m)
                ids = torch.zeros(m, w, dtype=torch.long)
                valid = torch.zeros(m, w, dtype=torch.bool)
                context = kv.visible_before(start[:m], c)[:, None, :].repeat(1, w, 1)  # [m, w, c]
                feats = (torch.zeros(m, w, self.draft.hidden_size, device=self.device, dtype=root.dtype)
                         if root is not None else None)  # fmt: skip
                for i, front in enumerate(fronts):
                    for s, node_id in enumerate(front):
                        node = trees[i].nodes[node_id]
                        # (a feature draft's node tokens index its own vocabulary: fed as target ids)
                        token = int(self._draft_vocab[node.token]) if self._draft_vocab is not None else node.token
                        ids[i, s], valid[i, s] = token, True
                        ancestor = node.parent
                        while ancestor >= 0:
                            context[i, s, trees[i].nodes[ancestor].col] = True
                            ancestor = trees[i].nodes[ancestor].parent
                        if feats is not None and root is not None:
                            feats[i, s] = hidden[i][node.parent] if node.parent >= 0 else root[i]
                positions = (context_len[:m, None] + level).expand(m, w).to(self.device)
                extra: dict[str, Any] = {"features": feats} if feats is not None else {}
                roots = torch.full((m, w), -1, device=self.device)  # levels attach through `context`
                out = kv.forward(
                    self.draft, ids.to(self.device), valid.to(self.device), parents=roots,
                    context=context.to(self.device), positions=positions, **extra,
                )  # fmt: skip
                q = process_logits(out.logits, temp[:m], top_p[:m]).cpu()  # [m, w, N']
                u = self._uniforms(rows[:m], [len(f) * specs[i].width for i, f in enumerate(fronts)], w * width)
                for i, front in enumerate(fronts):
                    for s, node_id in enumerate(front):
                        trees[i].nodes[node_id].col = c + s
                        if self.feature_draft:
                            hidden[i][node_id] = out.hidden_states[i, s]
                        trees[i].propose(node_id, q[i, s], u[i, s * specs[i].width :])
            kv.drop_from(start)
        k = max((min(s.nodes, len(t.nodes)) for s, t in zip(specs, trees)), default=0)
        tokens = torch.full((n_rows, k), -1, dtype=torch.long)
        probs = torch.zeros(n_rows, k, self.vocab_size)
        parents = torch.full((n_rows, k), -1, dtype=torch.long)
        for i, tree in enumerate(trees):
            kept = tree.best()
            index = {node_id: j for j, node_id in enumerate(kept)}
            for j, node_id in enumerate(kept):
                node = tree.nodes[node_id]
                dist = tree.dists[node.dist]
                if self._draft_vocab is not None:  # back to target token ids
                    tokens[i, j] = self._draft_vocab[node.token]
                    probs[i, j, self._draft_vocab] = dist
                else:
                    tokens[i, j] = node.token
                    probs[i, j] = dist
                parents[i, j] = index[node.parent] if node.parent >= 0 else -1
        return tokens, probs, parents

    def _draft_catch_up(self, rows: list[_Request]) -> Any:
        """The first draft forward of a step, on the first len(rows) rows: it feeds every token
        the draft cache has not seen (one, or two after a fully accepted chain, more after
        steps without speculation or after a tree; for a feature draft, every token accepted
        in the last step, now with the target's true features). Returns the draft's output."""
        assert self.draft is not None and self._draft_kv is not None
        pending = [r.draft_pending for r in rows]
        width = max(len(p) for p in pending)
        # left-padded, so that every row's last token sits in the last column
        ids = torch.tensor([[0] * (width - len(p)) + p for p in pending], device=self.device)
        valid = torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in pending])[:, None]
        extra: dict[str, Any] = {}
        if self.feature_draft:
            dtype = rows[0].draft_features[0].dtype if rows[0].draft_features else None
            feats = torch.zeros(len(rows), width, self.draft.hidden_size, device=self.device, dtype=dtype)
            for i, r in enumerate(rows):
                feats[i, width - len(r.draft_features) :] = torch.stack(r.draft_features)
                r.draft_features = []
            extra["features"] = feats
        out = self._draft_kv.forward(self.draft, ids, valid.to(self.device), logits_to_keep=1, **extra)
        for r in rows:
            r.draft_pending = []
        return out

    def _verify(self, rows: list[_Request], fl: _Inflight, cut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target forwards over [last token, verified drafts] per row; roll caches back.

        Rows are in draft-length order, so verify lengths mostly fall along the batch: where
        one forward over the whole [rows, longest] rectangle would mostly compute padding, the
        rows split into two ranges, each as wide as its own longest (`verify_split`). A tree
        step verifies each row's first `cut` nodes in one forward with a tree mask, and keeps
        only the accepted path in the cache."""
        n = fl.rows
        t = int(cut.max()) + 1
        ids = torch.zeros(n, t, dtype=torch.long)
        ids[:, 0] = torch.tensor([r.target_pending[-1] for r in rows])
        if t > 1:
            ids[:, 1:] = fl.tokens[:, : t - 1].clamp(min=0)
        valid = torch.arange(t)[None, :] <= cut[:, None]
        tree = fl.parents is not None
        slot_parents = _slot_parents(fl.parents, t) if fl.parents is not None else None
        extra: dict[str, Any] = {"output_hidden_states": True} if self.feature_draft else {}
        temp, top_p, _ = self._sampling_tensors(rows)
        if tree:
            k = fl.tokens.shape[1]
            uniforms = self._uniforms(rows, [int(v) + 1 for v in fl.draft_len], k + 1)
            fl.path = torch.zeros(n, k, dtype=torch.bool)
        else:
            uniforms = self._uniforms(rows, [int(v) + 1 for v in cut], t)
        accepted = torch.zeros(n, dtype=torch.long)
        next_tokens = torch.zeros(n, dtype=torch.long)
        features: torch.Tensor | None = None
        for r0, r1 in verify_split(cut):
            w = int(cut[r0:r1].max()) + 1
            part = slice(r0, r1)
            parents = slot_parents[part, :w].to(self.device) if slot_parents is not None else None
            out = self._target_kv.forward(
                self.target, ids[part, :w].to(self.device), valid[part, :w].to(self.device), parents=parents,
                first_row=r0, **extra,
            )  # fmt: skip
            if self.feature_draft:
                h = out.hidden_states[-1]
                if features is None:
                    features = h.new_zeros(n, t, h.shape[-1])
                features[part, :w] = h
            logits = out.logits.float().cpu()
            if fl.parents is not None and fl.path is not None:
                result = self.tree_verifier(
                    logits, fl.probs[part], fl.tokens[part], fl.parents[part], cut[part], temp[part], top_p[part],
                    uniforms[part],
                )  # fmt: skip
                fl.path[part] = result.path
                keep = torch.zeros(r1 - r0, w, dtype=torch.bool)
                keep[:, 0] = True
                keep[:, 1:] = result.path[:, : w - 1]
            else:
                result = self.verifier(
                    logits, fl.probs[part], fl.tokens[part], cut[part], temp[part], top_p[part], uniforms[part, :w],
                )  # fmt: skip
                keep = torch.arange(w)[None, :] <= result.accepted.cpu()[:, None]
            accepted[part], next_tokens[part] = result.accepted.cpu(), result.next_token.cpu()
            self._target_kv.keep_last(keep.to(self.device), first_row=r0)
        fl.target_features = features
        k = fl.tokens.shape[1]
        if not tree and fl.drafting and k > 1 and self._draft_kv is not None:
            # the draft cache holds d_1 .. d_{K-1} in its last K-1 columns; keep the accepted
            # ones (a feature draft keeps none: they are fed again with the target's features;
            # a tree's levels already left the draft cache)
            keep = torch.arange(1, k)[None, :] <= accepted[: fl.drafting, None]
            if self.feature_draft:
                keep = torch.zeros_like(keep)
            self._draft_kv.keep_last(keep.to(self.device))
        return accepted, next_tokens

    def _emit(self, rows: list[_Request], fl: _Inflight, accepted: torch.Tensor, next_tokens: torch.Tensor) -> None:
        for i, req in enumerate(rows):
            a, k, y = int(accepted[i]), int(fl.draft_len[i]), int(next_tokens[i])
            # the accepted draft nodes (a chain's first a; a tree's path), as target columns 1..
            nodes = fl.path[i].nonzero().squeeze(1).tolist() if fl.path is not None else list(range(a))
            new = [int(fl.tokens[i, j]) for j in nodes] + [y]
            fl.emitted[req.request_id] = self._append_output(req, new)
            req.target_pending = [y]
            if self.draft is None:
                continue
            if self.feature_draft:
                # tokens y_0 (already in the draft cache unless the row did not draft), d_1..d_a, y
                # pair with the target features computed at y_0, d_1, .., d_a
                assert fl.target_features is not None
                req.draft_pending = ([] if i < fl.drafting else req.draft_pending) + new
                # (copied: a view would keep the whole step's [rows, T, H] states alive)
                states = list(fl.target_features[i, [0] + [j + 1 for j in nodes]].clone().unbind(0))
                req.draft_features = ([] if i < fl.drafting else req.draft_features) + states
            elif fl.parents is not None and i < fl.drafting:
                req.draft_pending = new  # a tree's levels left the draft cache: feed the path again
            elif i < fl.drafting:
                req.draft_pending = [int(fl.tokens[i, k - 1]), y] if a == k else [y]
            else:
                req.draft_pending.append(y)

    def _append_output(self, req: _Request, tokens: list[int]) -> list[int]:
        """Append tokens up to a stop condition; returns those actually emitted."""
        kept = []
        for tok in tokens:
            req.output.append(tok)
            kept.append(tok)
            if req.sampling.stop_on_eos and tok in self.eos_ids:
                req.finish_reason = "eos"
            elif len(req.output) >= req.sampling.max_new_tokens:
                req.finish_reason = "length"
            elif req.context_len >= self.max_context:
                req.finish_reason = "context"
            if req.finish_reason is not None:
                break
        if req.playback is not None and kept:
            self._produce(req, time.perf_counter())
        return kept

    # ------------------------------------------------------------ bookkeeping
    def _arrange(self, groups: list[list[_Request]]) -> None:
        """Lay the rows out as consecutive segments, `groups` in order (order within a segment
        is free), moving as few rows as possible: a row already inside its segment stays put.
        Each moved row copies its KV cache, so a deferral or a new draft length costs the rows
        that change segment, not the batch."""
        group = {id(r): g for g, members in enumerate(groups) for r in members}
        slot = [g for g, members in enumerate(groups) for _ in members]  # the segment of each position
        order: list[int | None] = [None] * len(self._rows)
        movers: list[list[int]] = [[] for _ in groups]
        for i, r in enumerate(self._rows):
            if group[id(r)] == slot[i]:
                order[i] = i
            else:
                movers[group[id(r)]].append(i)
        perm = [i if i is not None else movers[slot[pos]].pop() for pos, i in enumerate(order)]
        if perm != list(range(len(perm))):
            self._permute(perm)

    def _drop_rows(self, drop: set[int]) -> None:
        """Remove rows `drop`; rows from the end move into their places (the others stay)."""
        if drop:
            keep = len(self._rows) - len(drop)
            tail = [i for i in range(keep, len(self._rows)) if i not in drop]
            self._permute([i if i not in drop else tail.pop() for i in range(keep)])
        else:
            self._target_kv.maybe_compact()
            if self._draft_kv is not None:
                self._draft_kv.maybe_compact()

    def _permute(self, perm: list[int]) -> None:
        self._target_kv.permute(perm)
        if self._draft_kv is not None:
            self._draft_kv.permute(perm)
        self._rows = [self._rows[i] for i in perm]

    def _join(self, joining: list[_Request]) -> None:
        """Move requests whose prompt is done from the prefill caches to the batch caches."""
        if not joining:
            return
        rows = [self._prefilling.index(r) for r in joining]
        if not self._rows and len(joining) == len(self._prefilling):
            # nothing is running and every prefill row is done: adopt the prefill caches
            self._permute_prefill(rows)
            self._target_kv, self._prefill_kv = self._prefill_kv, self._new_kv(self._target_kv)
            if self._draft_kv is not None and self._prefill_draft_kv is not None:
                self._draft_kv, self._prefill_draft_kv = self._prefill_draft_kv, self._new_kv(self._draft_kv)
            self._rows, self._prefilling = self._prefilling, []
            return
        for main, prefill in ((self._target_kv, self._prefill_kv), (self._draft_kv, self._prefill_draft_kv)):
            if main is not None and prefill is not None:
                main.reserve_rows(main.n_rows + len(rows))
                for r in rows:
                    main.add_row(prefill, r)
        self._rows += joining
        self._drop_prefill_rows(set(rows))

    def _drop_prefill_rows(self, drop: set[int]) -> None:
        self._permute_prefill([i for i in range(len(self._prefilling)) if i not in drop])

    def _permute_prefill(self, perm: list[int]) -> None:
        if perm == list(range(len(self._prefilling))):
            return
        self._prefill_kv.permute(perm)
        if self._prefill_draft_kv is not None:
            self._prefill_draft_kv.permute(perm)
        self._prefilling = [self._prefilling[i] for i in perm]

    def _new_kv(self, like: BatchKV) -> BatchKV:
        return BatchKV(len(like.layers), self.device, self.config.kv)

    def _finish(self, req: _Request, reason: str) -> None:
        req.finish_reason = reason
        now = self._now()
        units = misses = None
        if req.playback is not None:
            self._produce(req, now, finished=True)
            units, misses = req.playback.settle()
        self._finished[req.request_id] = RequestResult(
            req.request_id, req.prompt, req.output, reason, req.arrival_time, req.first_token_time, now, units, misses
        )

    def _produce(self, req: _Request, now: float, finished: bool = False) -> None:
        """Tell a streamed request's consumer how many complete units the output holds."""
        assert req.playback is not None
        unit = req.playback.stream.unit
        text = "" if unit == "token" else self.tokenizer.decode(req.output, skip_special_tokens=True)
        req.playback.produce(count_units(unit, len(req.output), text, finished), len(req.output), now, finished)

    def _check_cut(self, verify_len: Sequence[int] | torch.Tensor | None, fl: _Inflight) -> torch.Tensor:
        if verify_len is None:
            return fl.draft_len.clone()
        cut = torch.as_tensor(verify_len).to(torch.long).flatten().cpu()
        if cut.shape[0] != fl.rows:
            raise RequestError(f"verify_len has {cut.shape[0]} entries but {fl.rows} rows decode this step")
        bad = (cut < 0) | (cut > fl.draft_len)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise RequestError(
                f"verify_len[{i}] = {int(cut[i])} is outside [0, {int(fl.draft_len[i])}] (the row's draft length)"
            )
        return cut

    def _sampling_tensors(self, rows: list[_Request]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        temp = torch.tensor([r.sampling.temperature for r in rows], dtype=torch.float32)
        top_p = torch.tensor([r.sampling.top_p for r in rows], dtype=torch.float32)
        return temp, top_p, temp <= 0

    def _uniforms(self, rows: list[_Request], counts: list[int], width: int) -> torch.Tensor:
        """[len(rows), width] uniforms in [0, 1). A seeded sampled row's first `counts[i]`
        come from its own generator, exactly as many as it uses, so its draws never depend on
        the batch; the rest come from the engine's generator."""
        u = torch.rand(len(rows), width, generator=self._generator)
        for i, r in enumerate(rows):
            if r.generator is not None and r.sampling.temperature > 0:
                u[i, : counts[i]] = torch.rand(counts[i], generator=r.generator)
        return u

    def _now(self) -> float:
        if self.device.type == "cuda":  # step timings feed the step-cost model: wait for the kernels
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()
        return time.perf_counter()


def _slot_parents(parents: torch.Tensor, t: int) -> torch.Tensor:
    """[B, t] parents of the verify forward's slots: slot 0 (the last token) hangs off the
    context, node j sits in slot j + 1 under its parent's slot (0 for a child of the last token)."""
    slots = torch.full((parents.shape[0], t), -1, dtype=torch.long)
    if t > 1:
        p = parents[:, : t - 1]
        slots[:, 1:] = torch.where(p >= 0, p + 1, 0)
    return slots


def verify_split(cut: torch.Tensor, min_saving: float = 0.4, min_tokens: int = 48) -> list[tuple[int, int]]:
    """Row ranges for the verify forwards: the whole batch, or two ranges split where the
    computed tokens sum_range rows * (longest cut + 1) are smallest, when that saves at least
    `min_saving` of the [rows, longest + 1] rectangle of at least `min_tokens` tokens (a
    second forward re-reads the weights, which only a large saving pays for)."""
    n = len(cut)
    if n < 2:
        return [(0, n)]
    widths = (cut + 1).tolist()
    whole = n * max(widths)
    if whole < min_tokens:
        return [(0, n)]
    head = list(itertools.accumulate(widths, max))  # longest of rows [0, m]
    tail = list(itertools.accumulate(reversed(widths), max))[::-1]  # longest of rows [m, n)
    cost, m = min((m * head[m - 1] + (n - m) * tail[m], m) for m in range(1, n))
    return [(0, m), (m, n)] if cost <= (1 - min_saving) * whole else [(0, n)]


def verify_computed(cut: torch.Tensor | Sequence[int]) -> int:
    """Target tokens the verify forwards of a step with these verify lengths (rows in the
    engine's order: longest draft first) compute, padding included."""
    c = torch.as_tensor(cut, dtype=torch.long)
    if len(c) == 0:
        return 0
    return sum((r1 - r0) * (int(c[r0:r1].max()) + 1) for r0, r1 in verify_split(c))


def _length_groups(sizes: list[int], max_padding: float = 0.25) -> list[list[int]]:
    """Split sizes (sorted longest first) into runs whose padding to the run's first size
    wastes at most `max_padding` of the computed tokens."""
    groups: list[list[int]] = []
    for size in sizes:
        if groups and len(groups[-1]) * groups[-1][0] + groups[-1][0] <= (1 + max_padding) * (sum(groups[-1]) + size):
            groups[-1].append(size)
        else:
            groups.append([size])
    return groups


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


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
