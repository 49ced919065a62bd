"""The row-padding table measured N times afresh (`adactl.runtime.row_padding.measure`): which choices move.

    PYTHONPATH=. python docs/issue30/first_step/tables.py 5
"""
import os, sys, json, glob
import torch
torch.set_num_threads(2)
from adactl.runtime.models import load_pair
from adactl.runtime import row_padding as rp
pair = load_pair("default")
for i in range(int(sys.argv[1])):
    os.environ["ADACTL_CACHE"] = f"/tmp/rp_{i}"
    t, _ = rp.measure(pair.target.model)
    print(i, {k: v for k, v in t.to_dict().items() if v != list(range(1, 33))}, flush=True)
