"""`goodput`'s run-end rule, variants side by side in the replay of `make bench`'s cells.

    PYTHONPATH=. python docs/issue30/run_end/replay.py PROFILES SEEDS BATCHES TEMPERATURES VARIANTS

PROFILES: comma-separated profile files (the replay's truth); VARIANTS: comma-separated, each
`end_margin=X` (this code's rule with that margin for a longer draft) or a commit (that commit's
`makespan_rates`, priced linear in rows before cbc9ca6, with this code's 3% margin). Each cell
is served as `make bench` serves it (docs/issue30/drain/sweep.py: 32 tokens, 8 requests in
waves, k = 1, 2, 4, 5% step noise). Prints `goodput` / best fixed k per cell and variant (mean
and lowest over the seeds), then each variant's mean and its cells under 0.97.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import adactl.controllers.goodput as goodput

sys.path.insert(0, str(Path(__file__).parent.parent / "drain"))
sys.path.insert(0, str(Path(__file__).parent))
import sweep  # noqa: E402
from decisions import rule_of  # noqa: E402

sweep.PROFILE = "{}"  # a path, not a run number
INIT, RULE = goodput.GoodputLength.__init__, goodput.makespan_rates


def use(variant: str) -> None:
    """Serve `goodput` with `variant`'s run-end rule."""
    goodput.makespan_rates = RULE
    margin = 0.03
    if variant.startswith("end_margin="):
        margin = float(variant.split("=")[1])
    else:
        goodput.makespan_rates = rule_of(variant)

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        INIT(self, *args, **{**kwargs, "end_margin": margin})

    goodput.GoodputLength.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    profiles, seeds, batches, temperatures, variants = sys.argv[1:6]
    got: dict[str, dict[tuple, list[float]]] = {v: {} for v in variants.split(",")}
    for variant, cells in got.items():
        use(variant)
        for profile in profiles.split(","):
            for seed in range(int(seeds)):
                for r in sweep.cells(profile, seed, batches, temperatures):  # type: ignore[arg-type]
                    key = (Path(profile).parent.name, r["temperature"], r["batch_size"])
                    cells.setdefault(key, []).append(r["ratio_best_fixed"])
    for key in next(iter(got.values())):
        print(key, "  ".join(f"{v}: {statistics.mean(c[key]):.3f} (lowest {min(c[key]):.3f})" for v, c in got.items()))
    for variant, cells in got.items():
        ratios = [x for xs in cells.values() for x in xs]
        under = sum(x < 0.97 for x in ratios)
        print(f"{variant}: mean {statistics.mean(ratios):.4f}, under 0.97 {under} of {len(ratios)}")
