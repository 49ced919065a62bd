"""Profile replay: a stand-in for `Engine` that replays recorded costs instead of running models.

No model runs. A step's duration is the step-time model's prediction for the step's shape
(fitted on profiles the real engine recorded, `train/profile_steps.py`), times a log-normal
noise factor of the profile's spread; a drafted token is accepted with the recorded
conditional acceptance of its position (alpha_j, e.g. the shipped moving average). The
draws are common random numbers: a request's draft at output position p accepts its first
j tokens where the uniforms u[p, 0..j-1] (seeded by the engine's seed and the request id)
fall below alpha_0..alpha_{j-1}, so two controllers serving the same requests see the same
outcome wherever they draft at the same position, and a comparison between them is not
drowned in acceptance noise (greedy replay from traces, as issue 32 plans, is exact the
same way). Time is
simulated (`clock()`), so controllers that read the clock see replayed time, and a load
sweep that takes the real engine an hour runs in seconds, deterministically for a seed.

The request life cycle matches `Engine`: waiting -> prefilling (chunks within the step's
budget, admitted requests in order) -> running (first token at the end of the step that
completes the prompt) -> finished (by length; replayed outputs have no EOS). Deferred rows
keep their place. Streaming consumers are accounted as in the engine, with words and
sentences counted at a fixed number of tokens per unit (there is no text).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .shapes import StepShape
from .stream import Playback, Stream
from .types import SLO, DraftBatch, RequestError, RequestResult, RequestView, SamplingParams, StepOutcome, StepPlan

TOKENS_PER_UNIT = {"token": 1.0, "word": 1.3, "sentence": 20.0}


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

    def accepted(self, alpha: list[float], cut: int) -> int:
        """Tokens of a `cut`-token draft at the current output position the target accepts."""
        assert self.draws is not None and self.uniforms is not None
        u = self.uniforms.get(self.generated)
        if u is None:
            u = self.uniforms[self.generated] = [self.draws.random() for _ in alpha]
        a = 0
        while a < cut and u[a] < alpha[a]:
            a += 1
        return a

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.generated


class ReplayEngine:
    """Implements what `ControlLoop` needs of an engine (`adactl.loop.EngineLike`) plus
    `add_request`, `cancel`, `step` and `clock`."""

    def __init__(self, step_time: Any, alpha: Sequence[float] = (), max_batch_size: int = 64, noise: float = 0.0,
                 seed: int = 0, max_context: int = 8192) -> None:  # fmt: skip
        """step_time: a step-time predictor (`predict_parts` or `predict` over `StepShape`s).
        alpha: conditional acceptance by draft position (empty: no draft model).
        noise: standard deviation of the log step-time factor (0: exactly the prediction)."""
        self.step_time, self.alpha = step_time, [float(a) for a in alpha]
        self.max_batch_size, self.noise, self.max_context = max_batch_size, noise, max_context
        self.draft = object() if self.alpha else None  # ControlLoop reads this to allow drafting
        self.rng, self.seed = random.Random(seed), seed  # step-time noise; acceptance draws per request
        self.now = 0.0
        self._waiting: dict[str, _Replayed] = {}
        self._rows: list[_Replayed] = []
        self._finished: dict[str, RequestResult] = {}
        self._next_id = 0
        self._pending: tuple[StepPlan, DraftBatch, dict[str, list[int]], int, dict[str, str]] | None = None
        self._joining: list[_Replayed] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        """An idle server waiting: the simulated clock moves on, nothing else happens."""
        self.now += max(0.0, seconds)

    # ------------------------------------------------------------ requests
    def add_request(self, prompt: Sequence[int] | int, sampling: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None, slo: SLO | None = None,
                    stream: Stream | None = None) -> str:  # fmt: skip
        """prompt: token ids or just a prompt length. Raises `RequestError` on bad input."""
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
        draws = random.Random(f"{self.seed}:{request_id}")  # a str seed hashes the same in every process
        self._waiting[request_id] = _Replayed(request_id, n, sampling, arrival, slo, playback, draws=draws, uniforms={})
        return request_id

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
            status = "running" if r.first_token_time is not None else ("prefilling" if r.prefilled else "waiting")
            pb = r.playback
            views.append(
                RequestView(
                    r.request_id,
                    status,
                    r.prompt_len,
                    r.prefilled,
                    r.generated,
                    r.context_len,
                    r.arrival_time,
                    r.first_token_time,
                    r.sampling,
                    r.slo,
                    pb.stream if pb is not None else None,
                    pb.progress(self.now) if pb is not None else None,
                )  # fmt: skip
            )
        return views

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._rows)

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
        if plan.tree is not None:
            raise RequestError("the replay engine models chains only (its profiles hold no tree acceptance): plan.tree")
        running = {r.request_id for r in self._rows}
        if plan.run is not None and not set(plan.run) <= running:
            raise RequestError(f"plan.run names requests that are not running: {sorted(set(plan.run) - running)[:5]}")
        if plan.admit is not None and not set(plan.admit) <= set(self._waiting):
            raise RequestError(f"plan.admit names requests that are not waiting: {sorted(set(plan.admit))[:5]}")
        # prefill: admitted waiting requests in order, within the budget and the batch size
        order = list(self._waiting) if plan.admit is None else list(plan.admit)
        room = self.max_batch_size - len(self._rows)
        budget = plan.prefill_budget
        emitted: dict[str, list[int]] = {}
        finished: dict[str, str] = {}
        prefill_tokens = 0
        joining: list[_Replayed] = []
        for rid in order:
            req = self._waiting[rid]
            if budget <= 0 or len(joining) >= room:
                break
            take = min(budget, req.prompt_len - req.prefilled)
            req.prefilled += take
            budget -= take
            prefill_tokens += take
            if req.prefilled == req.prompt_len:
                joining.append(req)
        run = [r for r in self._rows if plan.run is None or r.request_id in set(plan.run)]
        lens = [self._draft_len(plan.draft_len, r) for r in run]
        run_sorted = sorted(zip(run, lens), key=lambda x: -x[1])  # the engine's row order
        run = [r for r, _ in run_sorted]
        lens = [k for _, k in run_sorted]
        k = max(lens, default=0)
        b = len(run)
        tokens = torch.full((b, k), -1, dtype=torch.long)
        for i, n in enumerate(lens):
            tokens[i, :n] = 1
        drafts = DraftBatch(
            request_ids=tuple(r.request_id for r in run),
            tokens=tokens,
            draft_len=torch.tensor(lens, dtype=torch.long),
            probs=torch.zeros(b, k, 1),
            context_len=torch.tensor([r.context_len for r in run], dtype=torch.long),
            greedy=torch.tensor([r.sampling.temperature <= 0 for r in run], dtype=torch.bool),
        )
        self._joining = joining
        self._pending = (plan, drafts, emitted, prefill_tokens, finished)
        return drafts

    def _draft_len(self, draft_len: int | Mapping[str, int], req: _Replayed) -> int:
        k = draft_len.get(req.request_id, 0) if isinstance(draft_len, Mapping) else int(draft_len)
        k = min(k, len(self.alpha))
        return max(0, min(k, req.sampling.max_new_tokens - req.generated - 1))

    def verify(self, verify_len: Sequence[int] | torch.Tensor | None = None) -> StepOutcome:
        if self._pending is None:
            raise RuntimeError("no drafts to verify: call draft_step() (or step()) first")
        _, drafts, emitted, prefill_tokens, finished = self._pending
        cut = drafts.draft_len.clone() if verify_len is None else torch.as_tensor(verify_len).long().flatten()
        if cut.shape[0] != len(drafts.request_ids) or bool(((cut < 0) | (cut > drafts.draft_len)).any()):
            raise RequestError(f"verify_len must give each of the {len(drafts.request_ids)} rows 0..its draft length")

        shape = StepShape.of_lengths(cut, drafts.draft_len, prefill_tokens, int(drafts.context_len.sum()))
        parts = (
            self.step_time.predict_parts([shape])[0]
            if hasattr(self.step_time, "predict_parts")
            else [0.0, 0.0, float(self.step_time.predict([shape])[0])]
        )
        factor = math.exp(self.rng.gauss(0.0, self.noise)) if self.noise > 0 else 1.0
        prefill_s, draft_s, verify_s = (float(x) * factor for x in parts)
        self.now += prefill_s + draft_s + verify_s
        accepted = torch.zeros(len(cut), dtype=torch.long)
        rows = {r.request_id: r for r in self._rows}
        for i, rid in enumerate(drafts.request_ids):
            a = rows[rid].accepted(self.alpha, int(cut[i]))
            accepted[i] = a
            emitted[rid] = self._emit(rows[rid], a + 1, finished)
        for req in self._joining:  # prompts completed this step: their first token
            del self._waiting[req.request_id]
            req.first_token_time = self.now
            self._rows.append(req)
            emitted[req.request_id] = self._emit(req, 1, finished)
        self._rows = [r for r in self._rows if r.request_id not in finished]
        self._pending = None
        return StepOutcome(
            request_ids=drafts.request_ids, drafted=drafts.draft_len, verified=cut, accepted=accepted,
            emitted=emitted, finished=finished, prefill_tokens=prefill_tokens, prefill_s=prefill_s,
            draft_s=draft_s, verify_s=verify_s, total_s=prefill_s + draft_s + verify_s,
        )  # fmt: skip

    def _emit(self, req: _Replayed, n: int, finished: dict[str, str]) -> list[int]:
        n = min(n, req.sampling.max_new_tokens - req.generated, self.max_context - req.context_len)
        req.generated += n
        done = req.generated >= req.sampling.max_new_tokens or req.context_len >= self.max_context
        if req.playback is not None:
            per = TOKENS_PER_UNIT[req.playback.stream.unit]
            units = req.generated / per
            req.playback.produce(math.ceil(units) if done else int(units), req.generated, self.now, done)
        if done:
            finished[req.request_id] = "length" if req.generated >= req.sampling.max_new_tokens else "context"
            self._finish(req, finished[req.request_id])
        return [1] * n

    def _finish(self, req: _Replayed, reason: str) -> None:
        units = misses = None
        if req.playback is not None:
            units, misses = req.playback.settle()
        self._finished[req.request_id] = RequestResult(
            req.request_id, [0] * req.prompt_len, [1] * req.generated, reason, req.arrival_time,
            req.first_token_time, self.now, units, misses,
        )  # fmt: skip
