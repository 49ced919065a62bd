"""Controller variants for `run.py` (patched before the CLI runs).

- `hyst`: goodput keeps the length it drafted last step unless another is predicted faster by
  more than the margin (either direction); the first step as landed (`shortest_within`).
- `revertR`: the moving average's positions not observed on a step relax toward a slow average
  of the same labels (decay 0.998 an observation) by factor R a step, so a dip that stopped
  drafting does not freeze the estimate.
- `decayD[,S]`: the shipped moving average with decay D an outcome and a running-mean start
  whose prior counts as S outcomes (default 25; `inf`: none). Landed 2026-12-05: 0.995,25;
  before: `decay0.98,inf`.
- `A+B`: both.
"""

import numpy as np
import torch


def hysteresis() -> None:
    import adactl.controllers.goodput as g

    shortest = g.shortest_within

    def shortest_within_current(self, rates: np.ndarray) -> int:
        best = shortest(rates, self.margin)
        prev = getattr(self, "_prev", None)
        if prev is not None and prev < len(rates) and best != prev:
            challenger = int(np.argmax(rates))
            best = challenger if rates[challenger] > rates[prev] * (1 + self.margin) else prev
        return best

    act = g.GoodputLength.act

    def patched(self, state, utilities):
        g.shortest_within = lambda rates, margin: shortest_within_current(self, rates)
        try:
            plan = act(self, state, utilities)
        finally:
            g.shortest_within = shortest
        running = [r for r in state.running if state.plan.run is None or r.request_id in state.plan.run]
        if running:
            self._prev = plan.draft_len
        return plan

    g.GoodputLength.act = patched


def revert(r: float) -> None:
    from adactl.estimators.moving_average import MovingAverage

    learn = MovingAverage.learn

    def patched(self, observed: torch.Tensor, label: torch.Tensor) -> None:
        if not hasattr(self, "slow"):
            self.slow = self.mean.clone()
        k = min(observed.shape[1], len(self.mean))
        seen = torch.zeros(len(self.mean), dtype=torch.bool)
        for j in range(k):
            n = int(observed[:, j].sum())
            if n:
                seen[j] = True
                w = 0.998**n
                self.slow[j] = w * self.slow[j] + (1 - w) * label[observed[:, j], j].mean()
        learn(self, observed, label)
        self.mean[~seen] = r * self.mean[~seen] + (1 - r) * self.slow[~seen]

    MovingAverage.learn = patched


def decay(d: float, strength: float) -> None:
    import adactl.estimators.moving_average as a

    from_dict = a.MovingAverage.from_dict.__func__

    def patched(cls, data):  # the shipped estimator with another memory
        return from_dict(cls, {**data, "decay": d, "strength": strength})

    a.MovingAverage.from_dict = classmethod(patched)


def apply(name: str) -> None:
    for part in name.split("+"):
        if part.startswith("decay"):  # decayD or decayD,S
            d, strength = (part[5:] + ",25").split(",")[:2]
            decay(float(d), float(strength))
        elif part == "hyst":
            hysteresis()
        elif part.startswith("revert"):
            revert(float(part[6:]))
        else:
            raise SystemExit(f"unknown variant {part!r}")
