"""What the shipped traces say a controller could know before (or while) drafting, on the
computed H100's step costs, batch 1: the lag-1 correlation of a request's position-0 outcome
between consecutive positions, and an offline simulation of stopping the draft at the first
token whose draft confidence (or product of confidences, or companion signal) falls under a
threshold, against the best fixed k (every recorded request, 128 tokens each).

    python docs/issue34/signals.py
"""

from __future__ import annotations

import random

import numpy as np

from adactl.bench.spec_replay import truth
from adactl.estimators.step_cost import StepCostProfile
from adactl.profiler import named_profile
from adactl.runtime.shapes import StepShape
from adactl.runtime.traces import SIGNALS, shipped_traces

COST = truth(StepCostProfile.load(named_profile("h100-llama-3.1-8b")))
TRACES = shipped_traces("mixed", trees=False)
PROB, COMPANION = SIGNALS.index("token_prob"), SIGNALS.index("companion_token_prob")
_seconds: dict[tuple[int, int], float] = {}


def seconds(c: int, context: int) -> float:
    key = (c, context // 256)
    if key not in _seconds:
        _seconds[key] = float(COST.predict([StepShape.of_lengths([c], [c], 0, context, forwards=c)])[0])
    return _seconds[key]


def rate(policy, greedy: bool) -> float:
    """Tokens per second of drafting policy(signals) tokens each step, each request alone."""
    tokens, total = 0, 0.0
    for i, r in enumerate(TRACES.requests):
        if r.greedy != greedy:
            continue
        draws, n = random.Random(i), 1
        while n < 128:
            row = r.row(n)
            c = policy(r.signals[row])
            u = [draws.random() for _ in range(r.ratio.shape[1])]
            kept = 0
            while kept < c and u[kept] < r.ratio[row, kept]:
                kept += 1
            n, tokens, total = n + kept + 1, tokens + kept + 1, total + seconds(c, r.prompt_len + n)
    return tokens / total


def stop_below(tau: float, column: int, product: bool):
    def policy(signals: np.ndarray) -> int:
        c, value = 0, 1.0
        while c < signals.shape[0]:
            value = value * signals[c, column] if product else signals[c, column]
            if value < tau:
                break
            c += 1
        return c

    return policy


for greedy in (True, False):
    kind = "greedy" if greedy else "sampled"
    first = [r.ratio[:, 0] for r in TRACES.requests if r.greedy == greedy]
    lag = np.corrcoef(np.concatenate([f[:-1] for f in first]), np.concatenate([f[1:] for f in first]))[0, 1]
    best = max(rate(lambda s, k=k: k, greedy) for k in range(7))
    print(f"{kind}: lag-1 correlation of position-0 outcomes {lag:.3f}")
    for name, column, product in (("confidence", PROB, False), ("confidence product", PROB, True),
                                  ("companion product", COMPANION, True)):  # fmt: skip
        ratios = {tau: rate(stop_below(tau, column, product), greedy) / best for tau in (0.1, 0.2, 0.3, 0.4, 0.5)}
        tau = max(ratios, key=ratios.get)
        print(f"  stop at {name} < {tau}: {ratios[tau]:.3f} of the best fixed k")
