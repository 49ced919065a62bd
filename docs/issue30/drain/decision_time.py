"""The run-end rule's cost: `makespan_rates` per decision, rows x longest tokens to go.

    PYTHONPATH=. python docs/issue30/drain/decision_time.py

A linear step-cost stand-in (the rule's cost is its recursion, not the model's), alpha 0.47 then
0.55, 7 lengths; each row's tokens to go uniform in 1 .. L; median of 50 decisions. (Until
2026-12-07 a last column timed the kept table, `DoneTables`, through a stretch without
drafting; the chances since come from the step's generating function, `done_exactly`, with
nothing kept.)
"""

import time

import numpy as np
import torch

from adactl.controllers.goodput import makespan_rates


class Linear:
    def predict(self, shapes):
        return np.array([0.04 + 0.001 * s.rows + 0.01 * s.draft_tokens / max(s.rows, 1) for s in shapes])


alpha = torch.tensor([0.47] + [0.55] * 5)
for rows, most in ((8, 32), (8, 64), (64, 200), (256, 1000), (256, 4000)):
    left = torch.randint(1, most + 1, (rows,), generator=torch.Generator().manual_seed(0)).float()
    times = []
    for _ in range(50):
        t = time.perf_counter()
        makespan_rates(Linear(), alpha, left, rows * 100)
        times.append(time.perf_counter() - t)
    print(f"| {rows} | {most} | {1000 * float(np.median(times)):.2f} |")
