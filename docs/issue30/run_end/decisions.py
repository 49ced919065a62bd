"""`goodput`'s run-end decisions on real draws, against a Monte Carlo of the rest of the run.

    PYTHONPATH=. python docs/issue30/run_end/decisions.py PROFILE SEEDS ROUNDS BATCH TEMPERATURE \
        CONTROLLERS OUT [COMMIT]

Serves the cell as docs/issue30/draws/draws.py does (the real engine's draws, every step priced
by PROFILE, `--no-refine`) and records each decision `goodput` takes with nothing waiting and
more than one row running: its acceptance estimate, each row's tokens to go, draft lag and
context. For each it prints the run-end rule's (`makespan_rates`) predicted rate of drafting 1
and 2 tokens a row over plain decoding's, COMMIT's rule's too where given (its
adactl/controllers/goodput.py, by `git show`), and a Monte Carlo of the rest of the run under
each fixed length from that state with that acceptance estimate, every step priced by PROFILE
on its exact shape (the rows still running, their context, the draft's catch-up): the truth
the rule approximates, on its own inputs. Writes OUT.decisions.json.
"""

from __future__ import annotations

import importlib.util
import json
import runpy
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import adactl.controllers.goodput as goodput
from adactl.estimators.step_cost import StepCostProfile
from adactl.runtime.shapes import catchup_of

DRAWS = Path(__file__).parent.parent / "draws" / "draws.py"
decisions: list[dict] = []
act = goodput.GoodputLength.act


def recorded_act(self, state, utilities):  # type: ignore[no-untyped-def]
    plan = act(self, state, utilities)
    running = [r for r in state.running if state.plan.run is None or r.request_id in state.plan.run]
    if len(running) > 1 and not state.waiting and state.max_draft_len:
        decisions.append({"alpha": utilities.alpha.mean(0).tolist(), "left": [r.draft_room + 1 for r in running],
                          "lag": [r.draft_lag for r in running], "context": [r.context_len for r in running],
                          "chosen": plan.draft_len})  # fmt: skip
    return plan


def simulated(model, alpha: np.ndarray, state: dict, c: int, runs: int, rng: np.random.Generator) -> float:  # type: ignore[no-untyped-def]
    """Tokens a second of serving the rest of the run with every row drafting c, from `state`."""
    seconds, priced = 0.0, {}
    for _ in range(runs):
        left, context, lag = (np.array(state[k]) for k in ("left", "context", "lag"))
        while (left > 0).any():
            alive = left > 0
            shape = replace(goodput.chain_step(int(alive.sum()), c, int(context[alive].sum())),
                            catchup_tokens=catchup_of(list(lag[alive])) if c else 0)  # fmt: skip
            if shape not in priced:
                priced[shape] = float(model.predict([shape])[0])
            seconds += priced[shape]
            gain = 1 + (np.cumprod(rng.random((len(left), c)) < alpha[:c], 1).sum(1) if c else 0)
            left, context = np.where(alive, np.maximum(left - gain, 0), left), np.where(alive, context + gain, context)
            lag = np.where(alive, 1 if c else lag + gain, lag)
    return runs * float(np.sum(state["left"])) / seconds


def rule_of(commit: str):  # type: ignore[no-untyped-def]
    source = subprocess.run(["git", "show", f"{commit}:adactl/controllers/goodput.py"], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "goodput_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("goodput_then", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.makespan_rates


if __name__ == "__main__":
    profile, out, commit = sys.argv[1], sys.argv[7], sys.argv[8] if len(sys.argv) > 8 else None
    then = rule_of(commit) if commit else None
    goodput.GoodputLength.act = recorded_act  # type: ignore[method-assign]
    sys.argv = [str(DRAWS), *sys.argv[1:8]]
    runpy.run_path(str(DRAWS), run_name="__main__")
    model, rng = StepCostProfile.load(profile).model(), np.random.default_rng(0)
    gaps: dict[str, list[float]] = {"rule": [], "then": []}
    for i, x in enumerate(decisions):
        alpha, left = torch.tensor(x["alpha"]), torch.tensor(x["left"], dtype=torch.float32)
        ask = (model, alpha, left, sum(x["context"]))
        now = goodput.makespan_rates(*ask, catchup=catchup_of(x["lag"]))
        truth = np.array([simulated(model, alpha.numpy(), x, c, 400, rng) for c in (0, 1, 2)])
        x["rule"], x["monte_carlo"] = now.tolist(), truth.tolist()
        line = f"{i:3d} rows {len(left)} chose {x['chosen']} left {sorted(x['left'])} alpha {x['alpha'][0]:.2f}"
        line += f" | rule k1 {now[1] / now[0]:.3f} k2 {now[2] / now[0]:.3f}"
        gaps["rule"] += list(now[1:3] / now[0] / (truth[1:] / truth[0]))
        if then is not None:
            old = then(*ask, catchup=catchup_of(x["lag"]))
            x["then"] = old.tolist()
            line += f" | {commit} k1 {old[1] / old[0]:.3f} k2 {old[2] / old[0]:.3f}"
            gaps["then"] += list(old[1:3] / old[0] / (truth[1:] / truth[0]))
        print(line + f" | Monte Carlo k1 {truth[1] / truth[0]:.3f} k2 {truth[2] / truth[0]:.3f}", flush=True)
    for name, gap in gaps.items():
        if gap:
            g = np.array(gap)
            print(f"{name}: predicted / Monte Carlo ratio of k = 1, 2 to plain decoding: mean {g.mean():.3f}, "
                  f"{g.min():.3f}-{g.max():.3f} over {len(decisions)} decisions")  # fmt: skip
    Path(out + ".decisions.json").write_text(json.dumps(decisions))
