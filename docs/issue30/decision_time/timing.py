"""Per-call wall time of the control path's pieces on the replay (no profiler): estimate, act, verify.

    python docs/issue30/decision_time/timing.py bench spec --replay \\
        --profile docs/issue30/make_bench_run36/profile.json --batches 64 --temperatures 0 \\
        --controllers goodput --max-new-tokens 32 --rounds 1 --out /tmp/r

(the replay's oracles run too: `goodput-req.act` and `sv.act` are theirs and the stacks').
"""

import collections
import sys
import time
from typing import Any

import adactl.controllers.goodput as goodput
import adactl.controllers.request_goodput as request_goodput
import adactl.controllers.sv as sv
import adactl.estimators.base as base
import adactl.loop as loop
from adactl.cli import main as cli_main

spent: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])


def timed(owner: Any, name: str, label: str) -> None:
    f = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = f(*args, **kwargs)
        spent[label][0] += 1
        spent[label][1] += time.perf_counter() - start
        return out

    setattr(owner, name, wrapped)


timed(loop.ControlLoop, "_schedule", "loop._schedule")
timed(loop.ControlLoop, "_verify", "loop._verify")
timed(loop, "drop_bad_rows", "drop_bad_rows")
timed(goodput.GoodputLength, "act", "goodput.act")
timed(goodput, "goodput_rates", "goodput_rates")
timed(request_goodput.RequestGoodput, "act", "goodput-req.act")
timed(base.AcceptancePredictor, "estimate", "AcceptancePredictor.estimate")
timed(sv.SpeculativeVerification, "act", "sv.act")

if __name__ == "__main__":
    try:
        cli_main(sys.argv[1:])
    except SystemExit:
        pass
    for label, (calls, seconds) in sorted(spent.items()):
        print(f"{label:40s} {int(calls):6d} {1000 * seconds / max(calls, 1):.3f} ms/call")
