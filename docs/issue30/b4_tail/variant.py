"""`make bench`'s chronic cell, 0.7 batch 4, in the replay: `goodput` as shipped, and with the
run-end rule off (`nodrain`: the throughput rule always), on one seed.

    PYTHONPATH=. python docs/issue30/b4_tail/variant.py shipped|nodrain PROFILE SEED OUT
"""

import sys
from functools import partialmethod

from adactl.cli import main
from adactl.controllers import GoodputLength

variant, profile, seed, out = sys.argv[1:5]
if variant == "nodrain":
    GoodputLength.__init__ = partialmethod(GoodputLength.__init__, drain=False)  # type: ignore[method-assign]
sys.exit(main(["bench", "spec", "--replay", "--profile", profile, "--batches", "4", "--temperatures", "0.7",
               "--max-new-tokens", "32", "--min-requests", "8", "--ks", "1,2", "--rounds", "2", "--seed", seed,
               "--controllers", "no-spec;fixed-k1;fixed-k2;goodput", "--out", out]))
