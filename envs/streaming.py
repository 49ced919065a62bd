"""`adactl/Streaming-v0`: tune the streaming scheduler online, one engine step at a time.

An episode serves `episode_requests` requests arriving as a Poisson process at a load drawn
from `loads` (requests/s), each read by a consumer from `workloads.consumer_mix`; it ends when
all are served (or after `max_steps`). When the engine is idle the next arrival comes at once
(the gaps after it are kept), so no step is spent waiting.

- action: `MultiDiscrete([5, 5, 5])`: ProgressServe's admission threshold (`RISK_TARGETS`,
  the miss risk an admission may cause; the last, 0.999, admits whatever the batch can
  generate), its deferral margin (`DEFER_STEPS`: steps a safe reader must be able to wait;
  the first choice never defers) and a cap on requests in flight (`MAX_IN_FLIGHT`, vLLM's
  max_num_seqs; the last, none), so the analytic baselines' behaviours are actions too.
  The TTFT-bounded prefill budget runs after it, as in `adactl bench stream`.
- observation: `Box(0, 1)` of `N_FEATURES` features: in flight, waiting, running, recent
  arrival rate, least and mean slack of the running readers, the share of them with under
  half a second of slack, the oldest waiting request's share of its TTFT, predicted step
  time, recent miss rate.
- reward: (units read on time - `miss_penalty` * units missed) / 10 this step.

`reset(options={"baseline": stack})` runs an analytic stack instead of the action: any
non-speculating stack of `adactl.stacks` (`BASELINES` are the ones train/ppo.py compares
with: "fcfs", "fcfs-seqs16", "progressserve,ttft-budget", each with its defaults), so
baselines and policies can be compared on the very same episodes (same seed). Without one,
the stack is "progressserve,ttft-budget" with the action setting ProgressServe's knobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from adactl.controllers import ProgressServe
from adactl.controllers.observations import (
    DEFAULT_ACTION,
    DEFER_STEPS,
    MAX_IN_FLIGHT,
    RISK_TARGETS,
    StreamFeatures,
    apply_action,
)
from adactl.interface import ScheduleState
from adactl.loop import ControlLoop
from adactl.runtime.types import SamplingParams
from adactl.stacks import StackContext, build_stack, drafts

from .backends import Backend, reseed

N_FEATURES = StreamFeatures.size
BASELINES = ("fcfs", "fcfs-seqs16", "progressserve,ttft-budget")
POLICY_STACK = "progressserve,ttft-budget"  # the stack the action tunes (its first controller)


class StreamingEnv(gym.Env[np.ndarray, np.ndarray]):
    metadata = {"render_modes": []}

    def __init__(self, backend: str = "replay", loads: Sequence[float] = (1.0, 2.0, 3.0, 4.0),
                 episode_requests: int = 48, max_steps: int = 4000, miss_penalty: float = 20.0,
                 prompts: str = "sharegpt", model: str = "default", noise: float = 0.05,
                 max_new_tokens: int = 64, consumers: str = "mixed", device: str = "auto", dtype: str = "auto",
                 profile: str | None = None) -> None:  # fmt: skip
        """consumers: "mixed" (`workloads.consumer_mix`) or "tokens" (token and speech readers
        only; always so with the tiny models, which have no tokenizer to find words).
        device, dtype, profile: as `SpecDecodeEnv`'s."""
        if not loads or any(not (isinstance(x, (int, float)) and x > 0) for x in loads):
            raise ValueError(f"loads must be positive request rates, got {loads!r}")
        if episode_requests < 1 or max_steps < 1 or miss_penalty < 0:
            raise ValueError("episode_requests and max_steps must be >= 1 and miss_penalty >= 0")
        self.loads, self.episode_requests, self.max_steps = tuple(float(x) for x in loads), episode_requests, max_steps
        if consumers not in ("mixed", "tokens"):
            raise ValueError(f"consumers must be 'mixed' or 'tokens', got {consumers!r}")
        self.miss_penalty, self.max_new_tokens = miss_penalty, max_new_tokens
        self.tokens_only = consumers == "tokens" or model == "tiny"
        self.backend = Backend(backend, prompts, model, noise, 64, draft=False, device=device, dtype=dtype,
                               profile=profile)  # fmt: skip
        self.action_space = spaces.MultiDiscrete([len(RISK_TARGETS), len(DEFER_STEPS), len(MAX_IN_FLIGHT)])
        self.observation_space = spaces.Box(0.0, 1.0, (N_FEATURES,), dtype=np.float32)
        self._rng = np.random.default_rng()
        self.engine: Any = None
        self.load = self.loads[0]

    # ---------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = reseed(self, seed, options)
        from adactl.workloads import Arrival, OpenLoop, arrival_times, consumer_mix

        self.load = float(options.get("load", self._rng.choice(self.loads)))
        self.baseline = options.get("baseline")
        if self.baseline is not None:
            try:
                speculates = not isinstance(self.baseline, str) or drafts(self.baseline)
            except ValueError as e:
                raise ValueError(f"baseline {self.baseline!r}: {e}") from e
            if speculates:
                raise ValueError(f"baseline must name a stack that does not speculate (e.g. {BASELINES}), "
                                 f"got {self.baseline!r}")  # fmt: skip
        stack = build_stack(self.baseline or POLICY_STACK, StackContext(self.backend.step_time)).schedule
        episode_seed = int(self._rng.integers(2**31))
        self.engine = self.backend.new_engine(episode_seed)
        n = self.episode_requests
        times = arrival_times(n, self.load, episode_seed)
        streams = consumer_mix(n, episode_seed, tokens_only=self.tokens_only)
        arrivals = []
        for i in range(n):
            prompt, reply = self.backend.request(self._rng)
            sampling = SamplingParams(min(reply, self.max_new_tokens), stop_on_eos=False, seed=i)
            arrivals.append(Arrival(times[i], prompt, sampling, streams[i]))
        # the ProgressServe the action tunes (a baseline's run ignores it; info shows its knobs)
        self.ps = stack[0] if self.baseline is None else ProgressServe(self.backend.step_time)
        self.loop = ControlLoop(self.engine, schedule=stack, max_draft_len=0,
                                clock=lambda: self.backend.clock(self.engine))  # fmt: skip
        # an idle engine takes the next arrival at once (the gaps after it kept): no idle steps
        self.arrivals = OpenLoop(self.loop, arrivals, self.loop.clock, skip_idle=True)
        self._seen: dict[str, tuple[int, int]] = {}  # request -> (units read, misses) so far
        self._done: set[str] = set()
        self.features = StreamFeatures(self.backend.step_time)
        self._t = 0
        self.totals = {"read": 0, "misses": 0, "units": 0}
        self.arrivals.admit_due()
        return self._observe(), {"load": self.load}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = np.asarray(action).reshape(-1)
        sizes = (len(RISK_TARGETS), len(DEFER_STEPS), len(MAX_IN_FLIGHT))
        if a.shape != (3,) or not all(0 <= int(x) < m for x, m in zip(a, sizes)):
            raise ValueError(f"action must be [risk < {sizes[0]}, defer < {sizes[1]}, cap < {sizes[2]}] indices, "
                             f"got {action!r}")  # fmt: skip
        if self.baseline is None:
            apply_action(self.ps, a)
        record = self.loop.step()
        self.features.update(record)
        on_time, missed = self._account()
        self._t += 1
        self.arrivals.admit_due()
        done = self.arrivals.done()
        reward = (on_time - self.miss_penalty * missed) / 10.0
        info = {
            "on_time": on_time,
            "misses": missed,
            "step_s": float(record.outcome.total_s),
            "in_flight": len(self.engine.requests()),
            "risk_target": self.ps.target,
            "defer_steps": self.ps.defer_steps,
            "max_in_flight": self.ps.max_num_seqs,
            "fell_back": len(record.fallbacks),
        }
        if done or self._t >= self.max_steps:
            info["miss_rate"] = self.totals["misses"] / max(self.totals["units"], 1)
        return self._observe(), reward, done, (not done and self._t >= self.max_steps), info

    # --------------------------------------------------------------- helpers
    def _account(self) -> tuple[int, int]:
        """Units read on time and units missed since the last step, over every request."""
        current: dict[str, tuple[int, int]] = {}
        for v in self.engine.requests():
            if v.stream_progress is not None:
                current[v.request_id] = (v.stream_progress.units_read, v.stream_progress.misses)
        for rid, r in self.loop.results.items():  # finished: the settled account, once
            if rid not in self._done and r.stream_units is not None:
                current[rid] = (r.stream_units, r.stream_misses or 0)
                self._done.add(rid)
                self.totals["units"] += r.stream_units
        read = missed = 0
        for rid, (units, misses) in current.items():
            before = self._seen.get(rid, (0, 0))
            read += units - before[0]
            missed += misses - before[1]
            self._seen[rid] = (units, misses)
        read, missed = max(read, 0), max(missed, 0)
        self.totals["read"] += read
        self.totals["misses"] += missed
        return max(read - missed, 0), missed

    def _observe(self) -> np.ndarray:
        return self.features(ScheduleState(self.backend.clock(self.engine), tuple(self.engine.requests()), 0))


def default_action() -> np.ndarray:
    return np.asarray(DEFAULT_ACTION, dtype=np.int64)


__all__ = [
    "BASELINES",
    "DEFER_STEPS",
    "MAX_IN_FLIGHT",
    "N_FEATURES",
    "RISK_TARGETS",
    "StreamingEnv",
    "apply_action",
    "default_action",
]
