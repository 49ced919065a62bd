"""A profile's predicted T(k) / T(0) and its own steps' raw medians, each against the mean of its two checks.

    PYTHONPATH=. python docs/issue30/cell_noise.py 36 34 35 33

(`make bench` run N's `profile.json`, `check_s0.json`, `check_s7.json` under docs/issue30/make_bench_runN/.)
"""

import json
import statistics as st
import sys

from adactl.estimators.step_cost import StepCostProfile


def main(runs: list[str]) -> None:
    for run in runs:
        here = f"docs/issue30/make_bench_run{run}"
        StepCostProfile.load(f"{here}/profile.json")  # (a readable profile)
        cells: dict[tuple[int, int], list[float]] = {}
        for s in json.load(open(f"{here}/profile.json"))["steps"]:
            rows, k = s["rows"], s["max_draft"]
            whole = s["draft_tokens"] == rows * k and s["max_verify"] == k + 1
            if rows > 0 and s["prefill_tokens"] == 0 and whole:  # whole-batch steps: what the ratios are fitted on
                cells.setdefault((rows, k), []).append(s["prefill_s"] + s["draft_s"] + s["verify_s"])
        checks = [json.load(open(f"{here}/check_s{seed}.json"))["records"] for seed in (0, 7)]
        model_in = raw_in = total = 0
        for b in (1, 2, 4, 8, 16, 32, 64):
            line = []
            for k in (1, 2, 4):
                mine = [[r for r in c if r["batch_size"] == b and r["k"] == k][0] for c in checks]
                measured = sum(r["measured_ratio"] for r in mine) / 2
                model = mine[0]["predicted_ratio"] / measured - 1
                raw = st.median(cells[(b, k)]) / st.median(cells[(b, 0)]) / measured - 1
                model_in += abs(model) < 0.05
                raw_in += abs(raw) < 0.05
                total += 1
                line.append(f"k{k} model {100 * model:+.0f} raw {100 * raw:+.0f} (n {len(cells[(b, k)])})")
            print(f"run {run} batch {b}: " + " | ".join(line))
        print(f"run {run}: within 5% of the checks' mean: model {model_in}, raw medians {raw_in} of {total}")


if __name__ == "__main__":
    main(sys.argv[1:])
