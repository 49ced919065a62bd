"""Per cell: goodput's (or --controller NAME's) and the best adaptive's ratio to the best fixed k, mean
(min) over seeds, for each variant: python summary.py [--controller NAME] DIR_PREFIX... (each prefix +
seed number a `bench spec` --out directory)."""

import glob
import json
import sys

import numpy as np

ADAPTIVE = ("goodput", "goodput-req", "goodput,sv")
args = sys.argv[1:]
name = "goodput"
if args[:1] == ["--controller"]:
    name, args = args[1], args[2:]
for prefix in args:
    cells: dict = {}
    for d in sorted(glob.glob(prefix + "[0-9]*")):
        recs = json.load(open(glob.glob(f"{d}/spec*.json")[0]))["records"]
        for r in recs:
            key = (r["temperature"], r["batch_size"])
            if r["controller"] == name:
                cells.setdefault(key, {"goodput": [], "best": [], "drafted": []})["goodput"].append(r["ratio_best_fixed"])
                cells[key]["drafted"].append(r["mean_draft_len"])
        for key in cells:
            best = max(r["ratio_best_fixed"] for r in recs if (r["temperature"], r["batch_size"]) == key
                       and r["controller"] in ADAPTIVE)
            cells[key]["best"].append(best)
    print(prefix)
    for key, v in sorted(cells.items()):
        g, b = np.array(v["goodput"]), np.array(v["best"])
        print(f"  T={key[0]} b={key[1]:3d} {name} {g.mean():.3f} (min {g.min():.3f}) drafted {np.mean(v['drafted']):.2f}"
              f"  best adaptive {b.mean():.3f} (min {b.min():.3f})")
    allg = np.concatenate([v["goodput"] for v in cells.values()])
    allb = np.concatenate([v["best"] for v in cells.values()])
    print(f"  all: {name} mean {allg.mean():.4f}, cells < 0.97 {int((allg < 0.97).sum())} of {len(allg)};"
          f" best adaptive mean {allb.mean():.4f}, < 0.97 {int((allb < 0.97).sum())}")
