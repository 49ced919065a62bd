"""Per run and step shape (rows x longest draft), measured over modelled seconds, from the JSON
files `draws.py` writes: where this machine's steps depart from the profile's prices.

    python docs/issue30/draws/by_shape.py OUT.json [OUT2.json ...]
"""

import collections
import json
import statistics
import sys

ratios = collections.defaultdict(lambda: collections.defaultdict(list))
for path in sys.argv[1:]:
    for draw in json.load(open(path)):
        for run in draw["runs"]:
            for shape, steps in run["by_shape"].items():
                ratios[run["controller"]][shape] += [measured / modelled for measured, modelled in steps]
for name in ("fixed-k1", "goodput"):
    print(name)
    for shape, values in sorted(ratios[name].items(), key=lambda kv: tuple(map(int, kv[0].split("x")))):
        print(f"  {shape:5s} steps {len(values):3d}  measured / modelled: median {statistics.median(values):.2f}")
