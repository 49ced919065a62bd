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

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from .device import graphs_wanted
from .draft import Drafts, Proposer
from .feature_draft import is_feature_draft
from .graphs import CudaGraphs, StaticShapes
from .kv import KVConfig
from .models import eos_ids, output_vocab_size, prompt_ids
from .plan import check_cut, check_plan, segments
from .prefill import Prefill
from .rows import Request, Rows, RowSampling, slot_parents, verify_computed, verify_split
from .stream import Playback, Stream
from .types import (
    SLO,
    DraftBatch,
    RequestError,
    RequestResult,
    RequestView,
    SamplingParams,
    StepOutcome,
    StepPlan,
)
from .verify import Verifier, process_logits, sample, verify_chains, verify_trees

__all__ = ["Engine", "EngineConfig", "Prompt", "run_to_completion", "verify_computed", "verify_split"]

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]] | torch.Tensor


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
    the CPU runs the same static-shape forwards eagerly (what the tests check); False: every
    forward eager, as shapes come."""
    shapes: StaticShapes = field(default_factory=StaticShapes)
    """The buckets of static forwards (batch sizes, tokens per row, column blocks)."""


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
    prefill_s: float
    draft_s: float
    target_features: torch.Tensor | None = None  # [rows, T, H], feature drafts only
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
        self.verifier, self.tree_verifier = verifier, tree_verifier
        self.target = target.eval()
        self.draft = draft.eval() if draft is not None else None
        self.tokenizer = tokenizer
        self.device = next(target.parameters()).device
        self.vocab_size = output_vocab_size(target)
        # a feature draft (EAGLE-style) reads the target's last hidden state and proposes
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
        self.graphs = CudaGraphs(self.device) if graphs and self.device.type == "cuda" else None
        self.rows = Rows(text_config.num_hidden_layers, draft_layers, self.device, self.config.kv, static, self.graphs)
        self.prefill = Prefill(self.target, self.draft, self.feature_draft, self.rows, self.config.max_batch_size)
        self._waiting: dict[str, Request] = {}  # arrival order
        self._finished: dict[str, RequestResult] = {}
        self._inflight: _Inflight | None = None
        self._next_id = 0
        self._generator = torch.Generator().manual_seed(self.config.seed)  # seeds of unseeded requests

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
        for value, kind in ((slo, SLO), (stream, Stream)):
            if value is not None and not isinstance(value, kind):
                raise RequestError(f"{kind.__name__.lower()} must be an adactl.runtime.{kind.__name__}, "
                                   f"got {type(value).__name__}")  # fmt: skip
            if value is not None:
                value.validate()
        if stream is not None and stream.unit != "token" and self.tokenizer is None:
            raise RequestError(f"a stream read in {stream.unit}s needs a tokenizer, but this engine has none")
        ids = prompt_ids(prompt, self.tokenizer)
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
        self.rows.reset()
        self._waiting, self._inflight = {}, None
        return dropped

    def requests(self) -> list[RequestView]:
        """Unfinished requests: waiting or prefilling (arrival order), then running (row order)."""
        now = time.perf_counter()
        return [r.view(now) for r in [*self._waiting.values(), *self.rows.running]]

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self.rows.running)

    def pop_finished(self) -> list[RequestResult]:
        """Finished requests since the last call (each is returned once)."""
        done = list(self._finished.values())
        self._finished.clear()
        return done

    def kv_bytes(self, include_draft: bool = True) -> int:
        """Bytes held by KV caches: the batch and prefill caches of the target (and the draft's)."""
        return self.rows.nbytes(include_draft)

    def cached_tokens(self) -> int:
        """Real tokens held in the target's batch cache."""
        return self.rows.target.cached_tokens()

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
        t0 = self._now()
        emitted: dict[str, list[int]] = {}
        finished: dict[str, str] = {}
        joining, prefill_tokens = self._prefill(plan.prefill_budget, admit, emitted, finished)
        t1 = self._now()
        groups, lens, specs = segments(self.rows.running, run_ids, plan, self.max_context, self.draft is not None)
        self.rows.arrange(groups)
        n_draft = sum(len(g) for g in groups[:-2])
        n_rows = n_draft + len(groups[-2])
        drafting = self.rows.running[:n_draft]  # (in row order: a segment's order is free)
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
            n_rows, n_draft, draft_len, tokens, drafts, emitted, finished, joining, prefill_tokens, t1 - t0, t2 - t1
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
        accepted = torch.zeros(fl.rows, dtype=torch.long)
        if fl.rows:
            accepted, next_tokens = self._verify(rows, fl, cut)
            self._emit(rows, fl, accepted, next_tokens)
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
            prefill_s=fl.prefill_s,
            draft_s=fl.draft_s,
            verify_s=verify_s,
            total_s=fl.prefill_s + fl.draft_s + verify_s,
            path=fl.path,
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
        t = fl.tokens.shape[1] + 1
        if not rows:
            return torch.zeros(0, t, self.vocab_size, device=self.device)
        ids = self._verify_ids(rows, fl, t)
        valid = (torch.arange(t)[None, :] <= fl.draft_len[:, None]).to(self.device)
        parents = slot_parents(fl.drafts.parents, t).to(self.device) if fl.drafts.parents is not None else None
        out = self.rows.target.forward(self.target, ids, valid, parents=parents)
        self.rows.target.keep_last(torch.zeros(fl.rows, t, dtype=torch.bool, device=self.device))
        s = RowSampling(rows, self.device)
        return process_logits(out.logits, s.temperature, s.top_p)

    def synchronize(self) -> None:
        """Wait for the work queued on the engine's device (for timing)."""
        self._now()

    # ----------------------------------------------------------------- phases
    def _prefill(
        self, budget: int, admit: list[Request], emitted: dict[str, list[int]], finished: dict[str, str]
    ) -> tuple[list[Request], int]:
        """Prefill within the budget; requests whose prompt completes emit their first token
        (sampled together) and join the batch at the end of the step."""
        done, logits, used = self.prefill.run(budget, admit)
        if not done or logits is None:
            return [], used
        s = RowSampling(done, self.device)
        first = sample(process_logits(logits, s.temperature, s.top_p), s.greedy, s.uniforms([1] * len(done), 1)[:, 0])
        now = self._now()
        joining: list[Request] = []
        for req, token in zip(done, first.tolist()):
            del self._waiting[req.request_id]
            req.first_token_time = now
            emitted[req.request_id] = self._append_output(req, [token])
            if req.finish_reason is not None:
                finished[req.request_id] = self._finish(req, req.finish_reason)
                continue
            req.target_pending, req.draft_pending = [token], [token]
            if self.feature_draft:
                assert req.last_feature is not None
                req.draft_features, req.last_feature = [req.last_feature], None
            joining.append(req)
        self.rows.drop_prefill({i for i, r in enumerate(self.rows.prefilling) if r.finish_reason is not None})
        return joining, used

    def _verify_ids(self, rows: list[Request], fl: _Inflight, t: int) -> torch.Tensor:
        """[rows, t] on the device: each row's last token, then its first t - 1 draft tokens."""
        ids = torch.zeros(len(rows), t, dtype=torch.long, device=self.device)
        ids[:, 0] = torch.tensor([r.target_pending[-1] for r in rows]).to(self.device)
        if t > 1:
            ids[:, 1:] = fl.drafts.tokens[:, : t - 1].clamp(min=0)
        return ids

    def _verify(self, rows: list[Request], fl: _Inflight, cut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target forwards over [last token, verified drafts] per row, the lossless rule on
        the device, one copy of the verdicts to the host; the caches roll back.

        Rows are in draft-length order, so verify lengths mostly fall along the batch: where
        one forward over the whole [rows, longest] rectangle would mostly compute padding, the
        rows split into two ranges, each as wide as its own longest (`verify_split`). A tree
        step verifies each row's first `cut` nodes in one forward with a tree mask, and keeps
        only the accepted path in the cache."""
        n, d = fl.rows, fl.drafts
        t = int(cut.max()) + 1
        ids = self._verify_ids(rows, fl, t)
        valid = (torch.arange(t)[None, :] <= cut[:, None]).to(self.device)
        tree_parents = slot_parents(d.parents, t).to(self.device) if d.parents is not None else None
        extra: dict[str, Any] = {"output_hidden_states": True} if self.feature_draft else {}
        s = RowSampling(rows, self.device)
        k = fl.tokens.shape[1]
        if d.parents is not None:
            uniforms = s.uniforms([int(v) + 1 for v in fl.draft_len], k + 1)
        else:
            uniforms = s.uniforms([int(v) + 1 for v in cut], t)
        verdict = torch.zeros(n, 2 + k, dtype=torch.long, device=self.device)  # accepted, next, path
        features: torch.Tensor | None = None
        for r0, r1 in verify_split(cut):
            w, part = int(cut[r0:r1].max()) + 1, slice(r0, r1)
            parents = tree_parents[part, :w] if tree_parents is not None else None
            out = self.rows.target.forward(self.target, ids[part, :w], valid[part, :w], parents=parents,
                                           first_row=r0, **extra)  # fmt: skip
            if self.feature_draft:
                h = out.hidden_states[-1]
                features = h.new_zeros(n, t, h.shape[-1]) if features is None else features
                features[part, :w] = h
            args = (out.logits, d.probs[part], d.tokens[part])
            rest = (cut[part], s.temperature[part], s.top_p[part], uniforms[part])
            if d.parents is not None:
                result = self.tree_verifier(*args, d.parents[part], *rest)
                keep = torch.cat([torch.ones_like(result.path[:, :1]), result.path[:, : w - 1]], 1)
                verdict[part, 2:] = result.path
            else:
                result = self.verifier(*args, cut[part], *rest[1:3], uniforms[part, :w])
                keep = torch.arange(w, device=self.device)[None, :] <= result.accepted.to(self.device)[:, None]
            verdict[part, 0], verdict[part, 1] = result.accepted, result.next_token
            self.rows.target.keep_last(keep.to(self.device), first_row=r0)
        fl.target_features = features
        verdict = verdict.cpu()  # the step's one copy back
        accepted, next_tokens = verdict[:, 0], verdict[:, 1]
        fl.path = verdict[:, 2:].bool() if d.parents is not None else None
        if d.parents is None and fl.drafting and k > 1 and self.rows.draft is not None:
            # the draft cache holds d_1 .. d_{K-1} in its last K-1 columns; keep the accepted
            # ones (a feature draft keeps none: they are fed again with the target's features;
            # a tree's levels already left the draft cache)
            keep = torch.arange(1, k)[None, :] <= accepted[: fl.drafting, None]
            if self.feature_draft:
                keep = torch.zeros_like(keep)
            self.rows.draft.keep_last(keep.to(self.device))
        return accepted, next_tokens

    def _emit(self, rows: list[Request], fl: _Inflight, accepted: torch.Tensor, next_tokens: torch.Tensor) -> None:
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
            elif fl.path is not None and i < fl.drafting:
                req.draft_pending = new  # a tree's levels left the draft cache: feed the path again
            elif i < fl.drafting:
                req.draft_pending = [int(fl.tokens[i, k - 1]), y] if a == k else [y]
            else:
                req.draft_pending.append(y)

    # ------------------------------------------------------------ bookkeeping
    def _append_output(self, req: Request, tokens: list[int]) -> list[int]:
        return req.append(tokens, self.eos_ids, self.max_context, self.tokenizer)

    def _finish(self, req: Request, reason: str) -> str:
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
