"""Each profile's predicted T(k) / T(0) against the mean (geometric) of several checks' measured ratios.

    python docs/issue30/profiler_20261205/mean_of_checks.py docs/issue30/profiler_20261205/check{1,2_s0,2_s7}.json
"""

import json
import sys

import numpy as np


def records(path: str) -> list[dict]:
    data = json.load(open(path))
    return data if isinstance(data, list) else data["records"]


checks = [records(p) for p in sys.argv[1:]]
cells = sorted({(r["batch_size"], r["k"]) for r in checks[0]})
measured = {c: [] for c in cells}
for recs in checks:  # every profile in a check priced the same steps: one measurement per cell
    seen = {}
    for r in recs:
        seen.setdefault((r["batch_size"], r["k"]), r["measured_ratio"])
    for c in cells:
        measured[c].append(seen[c])
mean = {c: float(np.exp(np.mean(np.log(v)))) for c, v in measured.items()}
profiles = dict.fromkeys(r["profile"] for recs in checks for r in recs)
for name in profiles:
    predicted = next({(r["batch_size"], r["k"]): r["predicted_ratio"] for r in recs if r["profile"] == name}
                     for recs in checks if any(r["profile"] == name for r in recs))
    e = np.array([predicted[c] / mean[c] - 1 for c in cells])
    print(f"{name.split('/')[-1]:24s} mean abs {100 * np.mean(np.abs(e)):4.1f}%  largest {100 * e[np.argmax(np.abs(e))]:+5.1f}%  "
          f"within 5%: {int(np.sum(np.abs(e) <= 0.05))} of {len(e)}")
