"""goodput in the replay with and without pricing the draft's catch-up (issue 30).

The replay's truth and the controllers' prior are one measured profile with the catch-up
term (`profile_slow_vm.json`: the default pair on the 2-core CPU); the replay counts each
row's lag as the engine does. `--blind` makes `goodput` and `goodput-req` read every lag as
1 (the controllers before they priced it) while the steps still pay for it. The rest is `make bench`'s sweep: 32
new tokens, k = 1, 2, 4, batch 1-64, both temperatures, on the shipped traces.

    PYTHONPATH=. python docs/issue30/catchup/replay_switch.py [--blind] --seed S --out DIR
"""

import sys

import adactl.controllers.goodput as goodput
import adactl.controllers.request_goodput as request_goodput
from adactl.cli import main

argv = sys.argv[1:]
if "--blind" in argv:
    argv.remove("--blind")
    goodput.catchup_of = request_goodput.catchup_of = lambda lags: 0
here = "docs/issue30/catchup/profile_slow_vm.json"
sys.exit(main(["bench", "spec", "--replay", "--profile", here, "--batches", "1,2,4,8,16,32,64", "--ks", "1,2,4",
               "--max-new-tokens", "32", "--replay-noise", "0.05",
               "--controllers", "no-spec;fixed-k1;fixed-k2;fixed-k4;goodput;goodput-req;goodput,sv", *argv]))
