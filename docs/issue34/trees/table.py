"""Token trees over the best chain per cell, from `adactl bench spec --replay --trees` JSON:
python docs/issue34/trees/table.py docs/issue34/trees/sharegpt/spec_trees_replay.json"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

ORACLES = {"oracle", "request-oracle", "lookahead-oracle", "tree-oracle"}


def main(path: str) -> None:
    records = json.load(open(path))["records"]
    fixed = sorted({r["controller"] for r in records if r["controller"].startswith("tree-d")})  # either width
    TREES = [*fixed, "goodput-tree,tree-alloc", "goodput-req-tree,tree-alloc", "tree-oracle"]
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        cells[(str(r["temperature"]), r["batch_size"])][r["controller"]] = r
    print("| temp | batch | best chain (tok/s) | " + " | ".join(TREES) + " | per-request ÷ batch tree |")
    print("|---" * (len(TREES) + 4) + "|")
    for (temp, batch), c in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        chains = [n for n in c if n not in ORACLES and n not in TREES]
        best = max(chains, key=lambda n: c[n]["tokens_per_s"])
        base = c[best]["tokens_per_s"]
        ratios = [f"{c[n]['tokens_per_s'] / base:.3f}" if n in c else "-" for n in TREES]
        req, batch_tree = c["goodput-req-tree,tree-alloc"], c["goodput-tree,tree-alloc"]
        own = req["tokens_per_s"] / batch_tree["tokens_per_s"]
        print(f"| {temp} | {batch} | {best}, {base:.0f} | " + " | ".join(ratios) + f" | {own:.3f} |")
    print()
    for temp in sorted({t for t, _ in cells}):
        lines = []
        for batch in (1, 2, 4):
            c = cells.get((temp, batch))
            if c is None:
                continue
            base = max(c[n]["tokens_per_s"] for n in c if n not in ORACLES and n not in TREES)
            stacks = [n for n in TREES if n in c and n not in ORACLES]
            top = max(stacks, key=lambda n: c[n]["tokens_per_s"])
            req = c["goodput-req-tree,tree-alloc"]["tokens_per_s"] / base
            lines.append(f"batch {batch}: goodput-req-tree {req:.3f}, best tree stack {top} {c[top]['tokens_per_s'] / base:.3f}")
        print(f"temperature {temp}: " + "; ".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
