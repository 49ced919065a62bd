"""A `bench spec` cell on the real engine, each run's steps priced by a fixed profile: the
draws' luck and the controllers' decisions stay, the machine's timing noise goes.

    PYTHONPATH=. python docs/issue30/draws/draws.py PROFILE SEEDS ROUNDS BATCH TEMPERATURE CONTROLLERS OUT

For each seed (a `--seed` of the bench: request i of round r samples with seed + 100000 r + i),
`adactl bench spec --no-refine --profile PROFILE` serves the cell; every counted step (each
wave's prefill step left out, as the bench counts) is priced by PROFILE's model on the shape
it had (`StepShape.of`), and each run's tokens over those seconds is its modelled rate.
`--no-refine` keeps the decisions off this machine's clock, so they depend on the draws and the
profile alone. Prints per round each run's measured and modelled tokens/s, both as ratios to
fixed k = 1's, and its steps by (rows, longest draft); writes OUT (JSON, every step's measured
and modelled seconds by shape). Each seed starts a fresh bench, so the shared acceptance
estimate starts at its prior there (in `make bench` it has learned from the smaller batches
first).
"""

import collections
import json
import sys

import adactl.bench.spec as spec
import adactl.loop as loop
from adactl.cli import build_parser
from adactl.estimators.step_cost import StepCostProfile
from adactl.runtime.shapes import StepShape

profile, seeds, rounds, batch, temperature, controllers, out = sys.argv[1:8]
model = StepCostProfile.load(profile).model()

loop_step = loop.ControlLoop.step


def kept_step(self):
    self.last = loop_step(self)
    return self.last


serving_step, serving_result = spec.Serving.step, spec.Serving.result


def priced_step(self):
    first = self.steps == self.start[2]  # the wave's first step, its prefill: not counted
    serving_step(self)
    if not hasattr(self, "modelled"):
        self.modelled, self.by_shape = [0.0, 0], collections.defaultdict(list)
    if not first:
        record = self.loop.last
        o = record.outcome
        seconds = float(model.predict([StepShape.of(record)])[0])
        self.modelled[0] += seconds
        self.modelled[1] += o.tokens_emitted
        rows = len(o.request_ids)
        self.by_shape[f"{rows}x{int(o.drafted.max()) if rows else 0}"].append((o.total_s, seconds))


def priced_result(self):
    r = serving_result(self)
    r["model_tps"] = self.modelled[1] / self.modelled[0]
    r["by_shape"] = dict(self.by_shape)
    return r


loop.ControlLoop.step, spec.Serving.step, spec.Serving.result = kept_step, priced_step, priced_result
rounds_seen: list[list[dict]] = []
interleaved = spec.interleaved


def kept_rounds(runs, seed, interleave=True):
    rounds_seen.append(interleaved(runs, seed, interleave))
    return rounds_seen[-1]


spec.interleaved = kept_rounds
results = []
for seed in (int(s) for s in seeds.split(",")):
    rounds_seen.clear()
    argv = ["bench", "spec", "--batches", batch, "--temperatures", temperature, "--controllers", controllers,
            "--rounds", rounds, "--seed", str(seed), "--no-refine", "--profile", profile,
            "--out", f"{out}.s{seed}"]  # fmt: skip
    spec.main(build_parser(argv).parse_args(argv))
    runs = [here for here in rounds_seen if here and here[0]["controller"] != "oracle"]  # the oracles' turns after
    for r, here in enumerate(runs):
        k1 = next(x for x in here if x["controller"] == "fixed-k1")
        for x in here:
            shapes = {k: len(v) for k, v in sorted(x["by_shape"].items())}
            print(f"seed {seed} round {r} {x['controller']:12s} measured {x['tokens_per_s']:6.1f} tok/s "
                  f"({x['tokens_per_s'] / k1['tokens_per_s']:.3f} of k = 1) modelled {x['model_tps']:6.1f} "
                  f"({x['model_tps'] / k1['model_tps']:.3f}) steps {x['steps']} {shapes}", flush=True)  # fmt: skip
        results.append({"seed": seed, "round": r, "runs": here})
json.dump(results, open(out, "w"), default=str)
