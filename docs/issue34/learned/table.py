"""The learned per-row policy beside the analytic length controllers in `adactl bench spec
--replay` records: per workload, temperature and batch size, each stack's tokens/s over the
best fixed k (0-4) of that batch size.

    python docs/issue34/learned/table.py docs/issue34/learned/bench_*/spec_*_replay.json
"""

from __future__ import annotations

import json
import sys

STACKS = ("goodput", "goodput-req", "learned-spec-h100", "learned-spec")


def fixed(name: str) -> bool:
    return name == "no-spec" or (name.startswith("fixed-k") and "," not in name)


def main(paths: list[str]) -> None:
    print("| workload | temperature | batch | best fixed | " + " | ".join(f"`{s}`" for s in STACKS) + " |")
    print("|---|---|---|---|" + "---|" * len(STACKS))
    for path in paths:
        doc = json.load(open(path))
        workload = doc["meta"].get("workload", "?")
        records = doc["records"]
        for t, b in sorted({(str(r["temperature"]), r["batch_size"]) for r in records}, key=lambda x: (x[0], x[1])):
            here = {r["controller"]: r["tokens_per_s"] for r in records
                    if str(r["temperature"]) == t and r["batch_size"] == b}  # fmt: skip
            best = max((n for n in here if fixed(n)), key=here.get)
            cells = " | ".join(f"{here[s] / here[best]:.3f}" if s in here else "-" for s in STACKS)
            print(f"| {workload} | {t} | {b} | {best} | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1:])
