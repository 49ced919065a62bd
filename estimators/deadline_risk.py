"""Deadline risk of a streaming request: P(its next consumable unit misses its deadline).

A reader consumes a request's output at `rate` tokens/s; `buffer` tokens are generated but
unread (DESIGN.md section 4). Unit m (of `unit` tokens) past the buffer is due at
t_m = (buffer + (m - 1) * unit) / rate. If the request runs every step from now on, after a
wait of `defer_steps` steps, it has produced about n * tau tokens after n steps of
`step_time` seconds (tau = tokens per step, with per-step standard deviation sigma).

- `AnalyticRisk`: the normal approximation of that count at each deadline within the
  horizon: risk = max_m P(N(n_m tau, n_m sigma^2) < m * unit), n_m = floor(t_m / step_time)
  - defer_steps. No fitting.
- `LearnedRisk`: a logistic classifier on the same quantities (in units of steps),
  fitted on simulated runs with noisy step times and accepted lengths
  (`simulate`, used by train/fit_estimators.py), or on recorded ones.

Both are vectorised over requests: every argument is a [R] tensor or a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .logistic import LogisticModel


@dataclass(frozen=True)
class StreamState:
    """The quantities deadline risk depends on, per streaming request."""

    buffer: torch.Tensor  # [R] float tokens generated but not yet read
    rate: torch.Tensor  # [R] float tokens/s the reader consumes
    step_time: torch.Tensor  # [R] float predicted seconds per engine step
    tokens_per_step: torch.Tensor  # [R] float mean tokens emitted per step when the request runs
    tokens_std: torch.Tensor | float = 0.5  # [R] float standard deviation of tokens per step
    unit: torch.Tensor | float = 1.0  # [R] float tokens per consumable unit (1 = a token; ~1.3 = a word)
    defer_steps: torch.Tensor | float = 0.0  # [R] float steps the request waits before it runs again
    horizon: float = 2.0  # seconds ahead that count


def _t(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32).expand_as(like).float()


class AnalyticRisk:
    name = "analytic"

    def __init__(self, max_units: int = 64) -> None:
        self.max_units = max_units

    def estimate(self, s: StreamState) -> torch.Tensor:
        """[R] probability that some unit due within the horizon misses its deadline."""
        buf = s.buffer.float()
        unit, std, defer = _t(s.unit, buf), _t(s.tokens_std, buf), _t(s.defer_steps, buf)
        m = torch.arange(1, self.max_units + 1, dtype=torch.float32)[None, :]  # [1, M]
        due = (buf[:, None] + (m - 1) * unit[:, None]) / s.rate.float()[:, None]  # [R, M]
        n = torch.floor(due / s.step_time.float()[:, None]) - defer[:, None]  # steps run before the deadline
        need = m * unit[:, None]
        mean = n.clamp(min=0) * s.tokens_per_step.float()[:, None]
        sd = (n.clamp(min=0).sqrt() * std[:, None]).clamp(min=1e-3)
        p = 0.5 * (1 + torch.erf((need - 0.5 - mean) / (sd * math.sqrt(2))))
        p = torch.where(n <= 0, torch.ones_like(p), p)  # no step before the deadline: a sure miss
        counts = due <= s.horizon
        counts[:, 0] = True  # the next unit always counts
        return (p * counts).amax(1)


def risk_features(s: StreamState) -> torch.Tensor:
    """[R, 6] the learned model's inputs, in steps: slack, supply/demand and their logs."""
    buf = s.buffer.float()
    unit, std, defer = _t(s.unit, buf), _t(s.tokens_std, buf), _t(s.defer_steps, buf)
    per_step_demand = s.rate.float() * s.step_time.float()  # tokens read per step
    slack = buf / per_step_demand.clamp(min=1e-6) - defer  # steps until the buffer runs dry
    ratio = s.tokens_per_step.float() / per_step_demand.clamp(min=1e-6)  # supply / demand
    return torch.stack(
        [slack, torch.log1p(slack.clamp(min=0)), torch.log(ratio.clamp(min=1e-3)), std / unit, unit, defer], dim=1
    )


class LearnedRisk:
    name = "learned"

    def __init__(self, model: LogisticModel | None = None) -> None:
        self.model = model or LogisticModel(6)

    def estimate(self, s: StreamState) -> torch.Tensor:
        return self.model.predict(risk_features(s))

    def fit(self, s: StreamState, missed: torch.Tensor) -> LearnedRisk:
        self.model.fit(risk_features(s), missed.float())
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnedRisk:
        return cls(LogisticModel.from_dict(d["model"]))


def simulate(n: int, seed: int = 0, horizon: float = 2.0) -> tuple[StreamState, torch.Tensor]:
    """`n` random streaming situations and whether each missed a deadline within the horizon.

    Step times vary by +-25% (log-normal) around the predicted one; tokens per step are
    1 + a geometric number of accepted draft tokens with the given mean; the reader
    consumes continuously at its rate."""
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    rate = u(3.0, 12.0)
    step_time = torch.exp(u(math.log(0.02), math.log(0.4)))
    tau = u(1.0, 3.0)
    unit = torch.where(torch.rand(n, generator=g) < 0.5, torch.ones(n), u(1.0, 4.0))
    buffer = torch.exp(u(0.0, math.log(40.0))) - 1
    defer = torch.floor(u(0.0, 4.0))
    # tokens per step: 1 + geometric(p) accepted, mean tau
    p_stop = 1.0 / tau
    missed = torch.zeros(n, dtype=torch.bool)
    produced = torch.zeros(n)
    t = defer * step_time  # the request waits, then runs every step
    for _ in range(int(math.ceil(horizon / 0.02)) + 8):
        t = t + step_time * torch.exp(0.25 * torch.randn(n, generator=g))
        # the reader runs dry once it has read every whole unit ready before this step ends
        ready = torch.floor((buffer + produced) / unit) * unit
        dry_at = ready / rate
        missed |= (dry_at < t) & (dry_at <= horizon)
        acc = torch.floor(torch.log(torch.rand(n, generator=g).clamp(min=1e-9)) / torch.log1p(-p_stop.clamp(max=0.999)))
        produced = produced + 1 + torch.where(tau <= 1.0001, torch.zeros(n), acc)
    tokens_std = torch.sqrt(tau * (tau - 1).clamp(min=0)) + 0.1  # geometric variance, roughly
    state = StreamState(buffer, rate, step_time, tau, tokens_std, unit, defer, horizon)
    return state, missed
