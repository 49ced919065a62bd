"""Where `make bench`'s best fixed k wins by > 5% over every other fixed k (fastest rounds), the k
`adactl export vllm` schedules there from a profile (its acceptance: the shipped moving average,
greedy rows; the temperature-0.7 rows are shown, but the export is not theirs).

    python docs/issue30/export_vs_bench.py docs/issue30/make_bench_run2/spec.json models/estimators/step_cost_cpu.json
"""

import json
import subprocess
import sys

from adactl.stacks import is_fixed


def draft_len(name: str) -> int:
    return 0 if name == "no-spec" else int(name.split("k")[1])


def main(bench: str, profile: str) -> None:
    command = [sys.executable, "-m", "adactl.cli", "export", "vllm", "--profile", profile, "--max-batch", "64"]
    ranges = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    ranges = ranges.get("num_speculative_tokens_per_batch_size", ranges)
    print("export:", ranges)
    records = json.load(open(bench))["records"]
    for t in sorted({r["temperature"] for r in records}):
        for b in sorted({r["batch_size"] for r in records}):
            fixed = sorted((r for r in records if r["temperature"] == t and r["batch_size"] == b
                            and is_fixed(r["controller"])),
                           key=lambda r: -r["tokens_per_s"])  # fmt: skip
            margin = fixed[0]["tokens_per_s"] / fixed[1]["tokens_per_s"] - 1
            best = draft_len(fixed[0]["controller"])
            scheduled = next(k for lo, hi, k in ranges if lo <= b <= hi)
            miss = "  MISMATCH" if margin > 0.05 and scheduled != best else ""
            print(f"t={t} b={b}: best k = {best} by {100 * margin:.0f}% ({'decisive' if margin > 0.05 else 'tie'}); "
                  f"export k = {scheduled}{miss}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
