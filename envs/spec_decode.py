"""`adactl/SpecDecode-v0`: choose how far to speculate, one engine step at a time.

One env step is one engine step over a batch that a closed-loop arrival process keeps at a
concurrency drawn per episode from `batch_sizes` (a finished request is replaced by a new
one, whose prompt is prefilled in the next steps, as in a server under steady load).

- action: `Discrete(max_draft_len + 1)`, the draft length every running request drafts this
  step (all of it verified; 0 = plain decoding).
- observation: `Box(0, 1)` of `N_FEATURES` normalised features of the batch: running
  requests (linear and log scale), waiting prompt tokens, mean context length, the
  acceptance estimate by draft position (the per-position moving average the goodput
  controller reads), the predicted step time of plain decoding and the predicted cost of
  each draft length relative to it (the step-time model), and the recent accepted length.
- reward: tokens emitted this step per second of the step's measured time, / 100.

Backends: `"replay"` (`ReplayEngine`: the shipped step-time model and acceptance by position,
log-normal step noise; deterministic for a seed and about a thousand steps per second) and
`"real"` (`Engine` on the default models, or tiny random ones with `model="tiny"`; measured
step times, so not deterministic). The analytic controllers act on the same state through
`baseline_action` (`goodput`, `no-spec` or `fixed-k{n}`, as `adactl.stacks` names them), so
their rewards on the very same episodes can be compared with the policy's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from adactl.controllers.observations import SpecFeatures
from adactl.interface import ScheduleState, StepRecord
from adactl.runtime.types import SamplingParams, StepPlan

from .backends import Backend, reseed

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class SpecDecodeEnv(gym.Env[np.ndarray, np.int64]):
    metadata = {"render_modes": []}

    def __init__(self, backend: str = "replay", batch_sizes: Sequence[int] = BATCH_SIZES, episode_steps: int = 64,
                 max_draft_len: int = 4, temperature: float = 0.0, prompts: str = "sharegpt", model: str = "default",
                 noise: float = 0.05, max_new_tokens: tuple[int, int] = (32, 256),
                 acceptance_jitter: float = 0.0, device: str = "auto", dtype: str = "float32",
                 profile: str | None = None) -> None:  # fmt: skip
        """backend: "replay" or "real". prompts: "sharegpt" (training split), "sharegpt-heldout"
        or "humaneval" (held-out evaluation). model: "default" (SmolLM2 + shipped draft) or
        "tiny" (tiny random models, for tests). acceptance_jitter (replay): each episode's
        acceptance by position is the shipped one times a factor drawn from 1 +- jitter, so a
        policy must read the acceptance estimate (as goodput does), not learn one level.
        device, dtype (real): where the models run. profile: a step-cost profile file (`adactl
        profile`): the replay's step costs (another machine's, e.g. a GPU's), or the real
        backend's cost features (default: this machine's, measured on first use)."""
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
        self.backend = Backend(backend, prompts, model, noise, max(self.batch_sizes), True, max_draft_len,
                               device=device, dtype=dtype, profile=profile)  # fmt: skip
        self.action_space = spaces.Discrete(max_draft_len + 1)
        self.observation_space = spaces.Box(0.0, 1.0, (SpecFeatures(max_draft_len, None).size,), dtype=np.float32)
        self._rng = np.random.default_rng()
        self.engine: Any = None
        self.concurrency = self.batch_sizes[0]
        self._t = 0

    # ---------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = reseed(self, seed, options)
        self.concurrency = int(options.get("batch_size", self._rng.choice(self.batch_sizes)))
        scale = 1.0 + self.acceptance_jitter * float(self._rng.uniform(-1.0, 1.0))
        self.engine = self.backend.new_engine(int(self._rng.integers(2**31)), scale)
        self.features = SpecFeatures(self.max_draft_len, self.backend.step_time, self.backend.new_estimator())
        self._t = 0
        self._fill()
        # prefill the first prompts so that the episode's steps are decoding steps
        while any(v.status != "running" for v in self.engine.requests()):
            self.engine.step(StepPlan(draft_len=0, prefill_budget=4096))
        return self._observe(), {"batch_size": self.concurrency}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        k = int(np.asarray(action).item())
        if not 0 <= k <= self.max_draft_len:
            raise ValueError(f"action must be a draft length in 0..{self.max_draft_len}, got {action!r}")
        state = self._state()
        plan = StepPlan(draft_len=k, prefill_budget=512)
        drafts = self.engine.draft_step(plan)
        outcome = self.engine.verify()
        record = StepRecord(state, plan, drafts, drafts.draft_len, outcome)
        predicted = float(self.backend.step_time.predict([self.features.shape(state, k)])[0])
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
        return self._observe(), tokens / seconds / 100.0, False, self._t >= self.episode_steps, info

    # ------------------------------------------------------------- analytic
    def baseline_action(self, name: str = "goodput") -> int:
        """The action an analytic controller takes in the current state, by its stack name:
        "goodput" (the goodput-optimal length from the same estimates the observation shows),
        "no-spec" or "fixed-k{n}"."""
        from adactl.stacks import parse

        if name == "no-spec":
            return 0
        if name.startswith("fixed-k") and parse(name):
            return min(int(name.removeprefix("fixed-k")), self.max_draft_len)
        if name != "goodput":
            raise ValueError(f"unknown baseline {name!r}: 'goodput', 'no-spec' or 'fixed-k<n>'")
        from adactl.controllers import GoodputLength

        state = self._state()
        estimator = self.features.estimator
        plan = GoodputLength(self.backend.step_time, estimator).act(state, estimator.estimate(state))
        return int(plan.draft_len) if isinstance(plan.draft_len, int) else 0

    # --------------------------------------------------------------- helpers
    def _fill(self) -> None:
        lo, hi = self.max_new_tokens
        while len(self.engine.requests()) < self.concurrency:
            prompt, reply = self.backend.request(self._rng)
            sampling = SamplingParams(min(max(reply, lo), hi), temperature=self.temperature, stop_on_eos=False,
                                      seed=int(self._rng.integers(2**31)))  # fmt: skip
            self.engine.add_request(prompt, sampling)

    def _state(self) -> ScheduleState:
        return ScheduleState(self.backend.clock(self.engine), tuple(self.engine.requests()), self.max_draft_len,
                             StepPlan(draft_len=0, prefill_budget=512))  # fmt: skip

    def _observe(self) -> np.ndarray:
        return self.features(self._state())


__all__ = ["BATCH_SIZES", "SpecDecodeEnv"]
