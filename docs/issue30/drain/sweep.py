"""`goodput` pricing the run's end against the throughput rule, in the replay with step noise.

    PYTHONPATH=. python docs/issue30/drain/sweep.py b8     # greedy batch 8, runs 38-41's profiles x 6 seeds
    PYTHONPATH=. python docs/issue30/drain/sweep.py grid   # batch 1-64, both temperatures, runs 39 and 41 x 3 seeds

Each cell is `adactl bench spec --replay` as `make bench` serves it (32 tokens, 8 requests in
waves below batch 8, k = 1, 2, 4), with `--replay-noise 0.05` (a CPU step varies by about 5%
between repetitions; at the default 2% the throughput rule's loss at batch 8 does not show).
The throughput rule is `GoodputLength(drain=False)`, patched in for the `throughput` half.
Writes results_<what>.md next to this file.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import adactl.controllers.goodput as goodput
from adactl.cli import main

HERE = Path(__file__).parent
PROFILE = "docs/issue30/make_bench_run{}/profile.json"
DRAIN = goodput.GoodputLength.__init__


def throughput_rule(self, *args, drain: bool = False, **kwargs) -> None:  # type: ignore[no-untyped-def]
    DRAIN(self, *args, drain=drain, **kwargs)


def cells(run: int, seed: int, batches: str, temperatures: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        main(["bench", "spec", "--replay", "--profile", PROFILE.format(run), "--batches", batches,
              "--temperatures", temperatures, "--ks", "1,2,4", "--rounds", "1", "--max-new-tokens", "32",
              "--min-requests", "8", "--seed", str(seed), "--replay-noise", "0.05",
              "--controllers", "no-spec;fixed-k1;fixed-k2;fixed-k4;goodput", "--out", out])  # fmt: skip
        records = json.loads((Path(out) / "spec_replay.json").read_text())["records"]
    return [r for r in records if r["controller"] == "goodput"]


def sweep(what: str) -> dict[str, dict[tuple[float, int], list[float]]]:
    runs, seeds, batches, temps = (([38, 39, 40, 41], range(6), "8", "0") if what == "b8"
                                   else ([39, 41], range(3), "1,2,4,8,16,32,64", "0,0.7"))  # fmt: skip
    got: dict[str, dict[tuple[float, int], list[float]]] = {"throughput": {}, "drain": {}}
    for rule in got:
        goodput.GoodputLength.__init__ = throughput_rule if rule == "throughput" else DRAIN  # type: ignore[method-assign]
        for run in runs:
            for seed in seeds:
                for r in cells(run, seed, batches, temps):
                    got[rule].setdefault((r["temperature"], r["batch_size"]), []).append(r["ratio_best_fixed"])
    goodput.GoodputLength.__init__ = DRAIN  # type: ignore[method-assign]
    return got


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "b8"
    got = sweep(what)
    lines = [f"`PYTHONPATH=. python docs/issue30/drain/sweep.py {what}`: `goodput` / best fixed k per cell, "
             "mean and lowest over profiles x seeds", "",
             "| temperature | batch | throughput rule: mean | lowest | pricing the end: mean | lowest |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for cell in sorted(got["drain"]):
        a, b = got["throughput"][cell], got["drain"][cell]
        lines.append(f"| {cell[0]:g} | {cell[1]} | {statistics.mean(a):.3f} | {min(a):.3f} | "
                     f"{statistics.mean(b):.3f} | {min(b):.3f} |")  # fmt: skip
    (HERE / f"results_{what}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
