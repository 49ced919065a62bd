"""Per profiler design (A: as shipped, uniform 16-256-token rows renewed past 384; B: the bench's row
lengths, renewed 64 tokens past their prompt; C: the bench's lengths, renewed past 384; D: A with up to
10 rounds a size, at least 6): how many of each check's 21 ratios its profiles predict within 5%.

    python docs/issue30/paired_cells/designs/tally.py
"""

import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
counts: dict[str, list[int]] = defaultdict(list)
print("| check (rows, seed) | " + " | ".join(f"design {d}" for d in "ABCD") + " |")
print("|---|---|---|---|---|")
for check in sorted(HERE.glob("x_*.json")):
    mine: dict[str, dict[str, int]] = defaultdict(dict)
    for r in json.load(open(check)):
        name = Path(r["profile"]).stem  # A_0 ...
        mine[name[0]][name] = mine[name[0]].get(name, 0) + (abs(r["error"]) <= 0.05)
    cells = []
    for design in "ABCD":
        within = [mine[design][n] for n in sorted(mine[design])]
        counts[design] += within
        cells.append(", ".join(map(str, within)))
    print(f"| {check.stem[2:]} | " + " | ".join(cells) + " |")
for design, within in counts.items():
    print(f"design {design}: {sum(within)} of {21 * len(within)} within 5%; all 21 in {within.count(21)} of "
          f"{len(within)} checks")

# the same check (rows, seed) taken twice, about 20 minutes apart (c_*: 12:21-12:24, x_*: 12:38-12:44): how far
# the machine's own ratios moved, whatever any profile says
print("\n| check | repeated | rms difference | largest | cells beyond 5% |\n|---|---|---|---|---|")
for first in sorted(HERE.glob("c_*.json")):
    again = HERE / ("x_" + first.name[2:])
    a, b = ({(r["batch_size"], r["k"]): r["measured_ratio"] for r in json.load(open(f))} for f in (first, again))
    d = [100 * (a[c] / b[c] - 1) for c in a]
    rms = (sum(x * x for x in d) / len(d)) ** 0.5
    worst = max(d, key=abs)
    print(f"| {first.stem[2:]} | {again.stem[2:]} | {rms:.1f}% | {worst:+.1f}% | {sum(abs(x) > 5 for x in d)} of {len(d)} |")
