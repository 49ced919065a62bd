"""How the controllers' step-cost model prices token trees on the computed H100 profile,
against the physics the replay charges (`PYTHONPATH=. python docs/issue34/trees_w4/pricing.py`).

The profile's basis is fitted on chain-shaped steps, where the draft tokens fed, the draft
forwards and the tokens verified per row move together; a tree feeds 1 + W (d - 1) tokens in d
forwards and verifies W d nodes, so its price is an extrapolation. Printed: model / physics
for plain decoding, chains k = 1, 2, 4, 6, and width-4 and width-2 trees of depth 2 and 3
(`tree_of_depth`: W d nodes), at 250 tokens of context a row."""

from __future__ import annotations

import numpy as np

from adactl.bench.spec_replay import truth
from adactl.controllers.trees import tree_shape
from adactl.estimators.step_cost import StepCostProfile
from adactl.profiler import named_profile

profile = StepCostProfile.load(named_profile("h100-llama-3.1-8b"))
model, physics = profile.model(refine=False), truth(profile)
names = ["plain", "k1", "k2", "k4", "k6", "w4 d2", "w4 d3", "w2 d2", "w2 d3"]
print("| rows | " + " | ".join(names) + " |")
print("|---" * (len(names) + 1) + "|")
for rows in (1, 2, 4, 8, 16, 64, 256):
    context = 250 * rows
    shapes = [tree_shape([c] * rows, 1, 0, context) for c in (0, 1, 2, 4, 6)]
    shapes += [tree_shape([d] * rows, w, 0, context) for w in (4, 2) for d in (2, 3)]
    ratio = model.predict(shapes) / np.asarray(physics.predict(shapes))
    print(f"| {rows} | " + " | ".join(f"{r:.3f}" for r in ratio) + " |")
