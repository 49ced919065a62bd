"""`adactl/SpecDecode-v0`: choose how far to speculate, one engine step at a time.

One env step is one engine step over a batch that a closed-loop arrival process keeps at a
concurrency drawn per episode from `batch_sizes` (a finished request is replaced by a new
one, whose prompt is prefilled in the next steps, as in a server under steady load).

- action: `Discrete(max_draft_len + 1)`, the draft length every running request drafts this
  step (all of it verified; 0 = plain decoding); with `per_row=True`, `Discrete(1 + K * 8)`:
  plain decoding, or a cap c and a threshold tau (`ROW_TAUS`), each request drafting up to c
  tokens while its own estimated survival clears tau (`observations.row_lengths`), so rows
  that accept more draft more in the same step.
- observation: `Box(0, 1)` of `N_FEATURES` normalised features of the batch: running
  requests (linear and log scale), waiting prompt tokens, mean context length, the
  acceptance estimate by draft position (the per-position moving average the goodput
  controller reads), the predicted step time of plain decoding and the predicted cost of
  each draft length relative to it (the step-time model), and the recent accepted length;
  per row, also each request's own estimate summarised per threshold (`RowFeatures`).
- reward: tokens emitted this step per second of the step's measured time, / 100; with
  `reward="speedup"`, that rate over plain decoding's predicted one in the same state (rows /
  the predicted plain step), about 1 at every batch size, so that a batch of 64 on a GPU
  (thousands of tokens a second) does not drown the batch of 1 in the returns. On a step that
  also prefills, the speedup prices the decision as `SunkPrefill` does: the step's seconds less
  the prefill's predicted cost on plain decoding (T(plain + prefill) - T(plain)), over plain
  decoding's rate without the prefill. The prefill is paid whatever is drafted, and the step's
  own rate counts it against plain decoding, so it rewards drafting beside a long prompt where
  plain decoding is faster (the fault `SunkPrefill` fixed in the controllers).

Backends: `"replay"` (`ReplayEngine`: the shipped step-time model and acceptance by position,
log-normal step noise; deterministic for a seed and about a thousand steps per second; with
`traces=`, each request follows a recorded per-request acceptance trace of the default pair,
the GPU regime's workload when `profile=` is a computed GPU profile) and
`"real"` (`Engine` on the default models, or tiny random ones with `model="tiny"`; measured
step times, so not deterministic). The analytic controllers act on the same state through
`baseline_action` (`goodput`, `no-spec` or `fixed-k{n}`, as `adactl.stacks` names them), so
their rewards on the very same episodes can be compared with the policy's (per row, also
`goodput-req`: the per-request goodput allocation's best action of the grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from adactl.controllers.observations import ROW_TAUS, RowFeatures, SpecFeatures, row_actions
from adactl.controllers.request_goodput import ragged_shape
from adactl.interface import ScheduleState, StepRecord
from adactl.runtime.types import SamplingParams, StepPlan

from .backends import Backend, reseed

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


REWARDS = ("tokens", "speedup")  # tokens/s / 100, or that rate over plain decoding's predicted one


class SpecDecodeEnv(gym.Env[np.ndarray, np.int64]):
    metadata = {"render_modes": []}

    def __init__(self, backend: str = "replay", batch_sizes: Sequence[int] = BATCH_SIZES, episode_steps: int = 64,
                 max_draft_len: int = 4, temperature: float = 0.0, prompts: str = "sharegpt", model: str = "default",
                 noise: float = 0.05, max_new_tokens: tuple[int, int] = (32, 256),
                 acceptance_jitter: float = 0.0, device: str = "auto", dtype: str = "auto",
                 profile: str | None = None, traces: str | None = None, trace_split: str = "train",
                 per_row: bool = False, reward: str = "tokens") -> None:  # fmt: skip
        """backend: "replay" or "real". prompts: "sharegpt" (training split), "sharegpt-heldout"
        or "humaneval" (held-out evaluation). model: "default" (SmolLM2 + shipped draft) or
        "tiny" (tiny random models, for tests). acceptance_jitter (replay): each episode's
        acceptance by position is the shipped one times a factor drawn from 1 +- jitter, so a
        policy must read the acceptance estimate (as goodput does), not learn one level.
        device, dtype (real): where the models run. profile: a step-cost profile file (`adactl
        profile`): the replay's step costs (another machine's, e.g. a GPU's), or the real
        backend's cost features (default: this machine's, measured on first use). traces
        (replay): the shipped per-request acceptance traces of a workload ("sharegpt",
        "humaneval" or "mixed"), each request following one at its temperature (greedy or 0.7;
        `temperature` and `acceptance_jitter` then do not apply); trace_split: "train" (every
        other recorded request, from the first), "heldout" (the others) or "all". per_row: the
        per-row action space; reward: "tokens" or "speedup" (module docstring)."""
        if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
        if episode_steps < 1 or max_draft_len < 1:
            raise ValueError("episode_steps and max_draft_len must be >= 1")
        self.batch_sizes = tuple(int(b) for b in batch_sizes)
        self.episode_steps, self.max_draft_len = episode_steps, max_draft_len
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        if not 0.0 <= acceptance_jitter < 1.0:
            raise ValueError(f"acceptance_jitter must be in [0, 1), got {acceptance_jitter}")
        self.acceptance_jitter = acceptance_jitter
        if reward not in REWARDS:
            raise ValueError(f"reward must be 'tokens' or 'speedup', got {reward!r}")
        self.reward = reward
        self.backend = Backend(backend, prompts, model, noise, max(self.batch_sizes), True, max_draft_len,
                               device=device, dtype=dtype, profile=profile, traces=traces,
                               trace_split=trace_split)  # fmt: skip
        recorded = self.backend.traces.max_draft if self.backend.traces is not None else max_draft_len
        if max_draft_len > recorded:
            raise ValueError(f"max_draft_len {max_draft_len} is more than the traces record ({recorded} positions)")
        self.per_row = per_row
        self._features = RowFeatures if per_row else SpecFeatures
        actions = row_actions(max_draft_len) if per_row else max_draft_len + 1
        self.action_space: spaces.Discrete = spaces.Discrete(actions)
        size = self._features(max_draft_len, None).size
        self.observation_space = spaces.Box(0.0, 1.0, (size,), dtype=np.float32)
        self._rng = np.random.default_rng()
        self.engine: Any = None
        self.features: Any = None
        self.concurrency = self.batch_sizes[0]
        self._t = 0

    # ---------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = reseed(self, seed, options)
        self.concurrency = int(options.get("batch_size", self._rng.choice(self.batch_sizes)))
        scale = 1.0 + self.acceptance_jitter * float(self._rng.uniform(-1.0, 1.0))
        self.engine = self.backend.new_engine(int(self._rng.integers(2**31)), scale)
        self.features = self._features(self.max_draft_len, self.backend.step_time, self.backend.new_estimator())
        self._t = 0
        self._fill()
        # prefill the first prompts so that the episode's steps are decoding steps
        while any(v.status != "running" for v in self.engine.requests()):
            self.engine.step(StepPlan(draft_len=0, prefill_budget=4096))
        return self._observe(), {"batch_size": self.concurrency}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = int(np.asarray(action).item())
        if not 0 <= a < self.action_space.n:
            raise ValueError(f"action must be in 0..{self.action_space.n - 1}, got {action!r}")
        state = self._state()
        plain_shape = self.features.shape(state, 0)
        if self.per_row:
            lengths = self.features.lengths(state, a)
            plan = StepPlan(draft_len={v.request_id: int(c) for v, c in zip(state.running, lengths.tolist())},
                            prefill_budget=512)  # fmt: skip
            shape = ragged_shape(lengths, plain_shape.prefill_tokens, plain_shape.context_tokens)
            k = float(lengths.float().mean()) if len(lengths) else 0.0
        else:
            plan, shape, k = StepPlan(draft_len=a, prefill_budget=512), self.features.shape(state, a), a
        drafts = self.engine.draft_step(plan)
        outcome = self.engine.verify()
        record = StepRecord(state, plan, drafts, drafts.draft_len, outcome)
        alone = replace(plain_shape, prefill_tokens=0, prefill_attention=0)  # the same rows, decoding alone
        predicted, plain, bare = (float(x) for x in self.backend.step_time.predict([shape, plain_shape, alone]))
        self.features.update(record)
        tokens = sum(len(outcome.emitted.get(rid, ())) for rid in outcome.request_ids)  # decode rows
        seconds = max(float(outcome.total_s), 1e-6)
        accepted = float(outcome.accepted.float().mean()) if len(outcome.accepted) else 0.0
        self.engine.pop_finished()
        self._fill()
        self._t += 1
        info = {
            "tokens_per_s": tokens / seconds,
            "accepted_len": accepted,
            "draft_len": k,
            "step_s": seconds,
            "step_time_error": abs(predicted - seconds) / seconds,
            "batch_size": self.concurrency,
        }
        reward = tokens / seconds / 100.0
        if self.reward == "speedup":  # the prefill is paid whatever is drafted: price the decision without it
            decision = max(seconds - max(plain - bare, 0.0), 0.1 * seconds)
            reward = tokens / decision / max(len(state.running) / max(bare, 1e-9), 1e-9)
        return self._observe(), reward, False, self._t >= self.episode_steps, info

    # ------------------------------------------------------------- analytic
    def baseline_action(self, name: str = "goodput") -> int:
        """The action an analytic controller takes in the current state, by its stack name:
        "goodput" (the goodput-optimal length from the same estimates the observation shows),
        "no-spec" or "fixed-k{n}"; per row, also "goodput-req" (of the action grid, the one
        with the most expected tokens per predicted second from the requests' own estimates)."""
        from adactl.stacks import parse

        if name == "goodput-req" and self.per_row:
            return self._goodput_req()
        if name == "no-spec":
            k = 0
        elif name.startswith("fixed-k") and parse(name):
            k = min(int(name.removeprefix("fixed-k")), self.max_draft_len)
        elif name == "goodput":
            from adactl.controllers import GoodputLength

            state = self._state()
            estimator = self.features.estimator
            plan = GoodputLength(self.backend.step_time, estimator, explore=0.0).act(state, estimator.estimate(state))
            k = int(plan.draft_len) if isinstance(plan.draft_len, int) else 0
        else:
            raise ValueError(f"unknown baseline {name!r}: 'goodput', 'no-spec' or 'fixed-k<n>'"
                             + (", 'goodput-req'" if self.per_row else ""))  # fmt: skip
        return 1 + (k - 1) * len(ROW_TAUS) if self.per_row and k else k  # per row: tau = 0, every row at k

    def _goodput_req(self) -> int:
        import torch

        from adactl.controllers.observations import row_lengths
        from adactl.controllers.request_goodput import RequestGoodput

        state = self._state()
        survival, room = self.features.survival(state), self.features.room(state)
        cands = torch.stack([row_lengths(survival, room, a) for a in range(self.action_space.n)])
        chooser = RequestGoodput(self.backend.step_time, self.features.rows, explore=0.0)
        context = sum(v.context_len for v in state.running)
        return chooser.best(cands, survival, context, self.features.shape(state, 0).prefill_tokens)

    # --------------------------------------------------------------- helpers
    def _fill(self) -> None:
        lo, hi = self.max_new_tokens
        while len(self.engine.requests()) < self.concurrency:
            trace = self.backend.trace(self._rng)
            if trace is None:
                prompt, reply = self.backend.request(self._rng)
                temperature = self.temperature
                reply = max(reply, lo)
            else:  # a recorded request: its prompt, its length (up to the longest), its temperature
                prompt, reply, temperature = trace.prompt_len, trace.positions + 1, 0.0 if trace.greedy else 0.7
            sampling = SamplingParams(min(reply, hi), temperature=temperature, stop_on_eos=False,
                                      seed=int(self._rng.integers(2**31)))  # fmt: skip
            self.engine.add_request(prompt, sampling, **({"trace": trace} if trace is not None else {}))

    def _state(self) -> ScheduleState:
        return ScheduleState(self.backend.clock(self.engine), tuple(self.engine.requests()), self.max_draft_len,
                             StepPlan(draft_len=0, prefill_budget=512))  # fmt: skip

    def _observe(self) -> np.ndarray:
        return self.features(self._state())


__all__ = ["BATCH_SIZES", "SpecDecodeEnv"]
