"""The profile's cells as medians of their steps (before) against paired with their rounds'
plain steps (`adactl.estimators.cost_surface.cell_values`, after), on profiles whose held-out
checks are saved: each profile's T(k) / T(0) predicted both ways at the checks' shapes (batch b,
every row drafting k, 150 tokens of context a row: within 0.1% of the checks' own predictions),
against the checks' measured ratios.

    PYTHONPATH=. python docs/issue30/paired_cells/refit.py            # make bench runs 38-43
    PYTHONPATH=. python docs/issue30/paired_cells/refit.py PROFILE CHECK.json [CHECK.json ...] [-- PROFILE ...]
"""

import json
import math
import sys
from pathlib import Path

import numpy as np

from adactl.estimators import cost_surface as cs
from adactl.estimators.step_cost import StepCostModel, StepCostProfile, features
from adactl.runtime.shapes import StepShape

HERE = Path(__file__).resolve().parent.parent
LIMIT = 0.05  # as `adactl profile --check` counts: |predicted / measured - 1| <= 5%


def unpaired(shapes: list[StepShape], residuals: np.ndarray) -> cs.CostSurface:
    """The fit before: a cell is the median of its steps' residuals."""
    surface = cs.CostSurface(cs.PROFILE)
    cells: dict[tuple[int, int], list[tuple[StepShape, float]]] = {}
    for s, r in zip(shapes, residuals):
        if cs.is_whole_batch(s):
            cells.setdefault((s.rows, s.max_draft), []).append((s, float(r)))
    for steps in cells.values():
        surface.observe(steps[len(steps) // 2][0], float(np.median([r for _, r in steps])), weight=len(steps))
    return surface


def models(path: str) -> dict[str, StepCostModel]:
    profile = StepCostProfile.load(path)
    shapes, seconds = profile.shapes()
    base = np.maximum(np.maximum(features(shapes) @ profile.theta, 0.0).sum(1), 1e-5)
    residuals = np.log(np.maximum(seconds.sum(1), 1e-9) / base)
    return {"medians": StepCostModel(profile.theta, unpaired(shapes, residuals), refine=False),
            "paired": profile.model(refine=False)}  # fmt: skip


def ratio(model: StepCostModel, b: int, k: int) -> float:
    shape = lambda j: StepShape.of_lengths([j] * b, [j] * b, 0, 150 * b)  # noqa: E731
    return float(model.predict([shape(k)])[0] / model.predict([shape(0)])[0])


def main(argv: list[str]) -> None:
    if argv:
        groups = [g.split() for g in " ".join(argv).split(" -- ")]
        jobs = [(g[0], g[1:]) for g in groups]
    else:
        runs = [HERE / f"make_bench_run{r}" for r in range(38, 44)]
        jobs = [(str(d / "profile.json"), [str(d / f"check_s{s}.json") for s in (0, 7)]) for d in runs]
    errors: dict[str, list[float]] = {"medians": [], "paired": []}
    print("| profile | check | cells as medians: within 5% of 21 (beyond) | paired: within 5% of 21 (beyond) |")
    print("|---|---|---|---|")
    for profile, checks in jobs:
        fitted = models(profile)
        for check in checks:
            data = json.load(open(check))
            records = data["records"] if isinstance(data, dict) else data
            seen = {}
            for r in records:  # a check of several profiles measures each cell once
                seen.setdefault((r["batch_size"], r["k"]), r["measured_ratio"])
            row = [Path(profile).parent.name + "/" + Path(profile).name, Path(check).name]
            for name, model in fitted.items():
                errs = {bk: math.log(ratio(model, *bk) / m) for bk, m in seen.items()}
                errors[name] += list(errs.values())
                beyond = [f"{b}/{k} {100 * math.expm1(e):+.1f}%" for (b, k), e in errs.items() if abs(math.expm1(e)) > LIMIT]
                row.append(f"{len(errs) - len(beyond)} ({', '.join(beyond) or '-'})")
            print("| " + " | ".join(row) + " |")
    for name, e in errors.items():
        x = np.array(e)
        print(f"{name}: rms error (log) {100 * math.sqrt(np.mean(x**2)):.2f}%, beyond 5%: {int((abs(np.expm1(x)) > LIMIT).sum())} "
              f"of {len(x)}")


if __name__ == "__main__":
    main(sys.argv[1:])
