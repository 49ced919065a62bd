"""A measured GPU profile's whole-batch steps next to a computed profile's prices for the same shapes.

    python docs/gpu/compare_profile.py MEASURED.json [COMPUTED]   # COMPUTED: a shipped name or file
                                                                  # (default h200-llama-3.1-8b)

Per (rows, k): the measured step's fastest and median milliseconds (a median far above the
fastest means steps that also captured CUDA graphs, which profiles before 2026-12-04 kept),
the computed profile's price and fastest / computed.
"""

from __future__ import annotations

import collections
import sys

import numpy as np

from adactl.estimators.step_cost import StepCostProfile
from adactl.profiler import named_profile


def main(measured_path: str, computed: str = "h200-llama-3.1-8b") -> None:
    measured = StepCostProfile.load(measured_path)
    model = StepCostProfile.load(named_profile(computed)).model()
    groups: dict[tuple[int, int], list[tuple[float, float]]] = collections.defaultdict(list)
    shapes, seconds_per_part = measured.shapes()
    for shape, seconds in zip(shapes, seconds_per_part):
        whole_batch = shape.prefill_tokens == 0 and shape.verify_tokens == shape.rows * (shape.max_draft + 1)
        if whole_batch and shape.rows > 0:
            groups[shape.rows, shape.max_draft].append((float(np.sum(seconds)), float(model.predict([shape])[0])))
    print(f"measured: {measured.fingerprint.machine_label} ({measured.fingerprint.target}); computed: {computed}")
    print("| rows | k | steps | fastest ms | median ms | computed ms | fastest / computed |")
    print("|---|---|---|---|---|---|---|")
    for (rows, k), pairs in sorted(groups.items()):
        t, c = np.array(pairs).T
        print(f"| {rows} | {k} | {len(t)} | {1000 * t.min():.2f} | {1000 * np.median(t):.2f} | {1000 * c.mean():.2f} "
              f"| {t.min() / c.mean():.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
