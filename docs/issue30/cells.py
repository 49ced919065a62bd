"""The issue-30 table of a `adactl bench spec` JSON: per temperature and batch size, the best
fixed configuration (its rounds), the best adaptive run, their ratio by fastest round and paired
within rounds, and goodput's own ratio.

    python docs/issue30/cells.py docs/issue30/make_bench_run2/spec.json
"""

import json
import sys

from adactl.stacks import is_fixed


def short(record: dict) -> str:
    return record["controller"].replace("fixed-", "")


def main(path: str) -> None:
    records = json.load(open(path))["records"]
    print("| temp | batch | best fixed k (tok/s; its rounds) | best adaptive (tok/s) | ratio, fastest round "
          "| ratio, paired | goodput alone |")
    print("|---|---|---|---|---|---|---|")
    for t in sorted({r["temperature"] for r in records}):
        for b in sorted({r["batch_size"] for r in records}):
            here = [r for r in records if r["temperature"] == t and r["batch_size"] == b]
            fixed = max((r for r in here if is_fixed(r["controller"])), key=lambda r: r["tokens_per_s"])
            adaptive = [r for r in here if not is_fixed(r["controller"]) and "oracle" not in r["controller"]]
            best = max(adaptive, key=lambda r: r["tokens_per_s"])
            paired = max(adaptive, key=lambda r: r.get("ratio_paired", 0))
            goodput = next(r for r in here if r["controller"] == "goodput")
            p = f"{paired['ratio_paired']:.2f} ({short(paired)})" if "ratio_paired" in paired else "-"
            rounds = " / ".join(f"{x:.1f}" for x in fixed["rounds"])
            print(f"| {t} | {b} | {short(fixed)}, {fixed['tokens_per_s']:.1f} ({rounds}) | {short(best)}, "
                  f"{best['tokens_per_s']:.1f} | {best['ratio_best_fixed']:.2f} | {p} | "
                  f"{goodput['ratio_best_fixed']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
