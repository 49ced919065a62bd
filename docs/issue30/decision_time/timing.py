"""Per-call wall time of the control path's pieces on the replay (no profiler): estimate, act, verify.

    python docs/issue30/decision_time/timing.py bench spec --replay --profile docs/issue30/make_bench_run36/profile.json \
        --batches 64 --temperatures 0 --controllers goodput --max-new-tokens 32 --rounds 1 --out /tmp/r

(the replay's oracles run too: `goodput-req.act` and `sv.act` are theirs and the stacks')."""
import sys, time, collections
import adactl.loop as L
from adactl.cli import main as cli_main

acc = collections.defaultdict(lambda: [0, 0.0])
def timed(obj, name, label):
    f = getattr(obj, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); acc[label][0] += 1; acc[label][1] += time.perf_counter() - t; return r
    setattr(obj, name, g)

import adactl.controllers.goodput as G, adactl.controllers.request_goodput as RG, adactl.controllers.sv as SV
import adactl.estimators.base as EB, adactl.estimators.moving_average as MA, adactl.estimators.request_acceptance as RA
timed(L.ControlLoop, "_schedule", "loop._schedule")
timed(L.ControlLoop, "_verify", "loop._verify")
timed(G.GoodputLength, "act", "goodput.act")
timed(G, "goodput_rates", "goodput_rates")
timed(RG.RequestGoodput, "act", "goodput-req.act")
for cls in (EB.AcceptancePredictor, RA.RequestAcceptance):
    if hasattr(cls, "estimate"): timed(cls, "estimate", f"{cls.__name__}.estimate")
timed(L, "drop_bad_rows", "drop_bad_rows")
timed(SV.SpeculativeVerification, "act", "sv.act") if hasattr(SV, "SpeculativeVerification") else None
sys.argv = ["adactl", *sys.argv[1:]]
try:
    cli_main()
except SystemExit:
    pass
for k, (n, s) in sorted(acc.items()):
    print(f"{k:40s} {n:6d} {1000*s/max(n,1):.3f} ms/call")
