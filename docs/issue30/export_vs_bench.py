# python docs/issue30/export_vs_bench.py docs/issue30/make_bench_run2/spec.json models/estimators/step_cost_cpu.json
"""Where make bench's best fixed k wins by > 5% over every other fixed k (fastest rounds), the k
`adactl export vllm` schedules there from a profile (its acceptance: the shipped moving average,
greedy rows; the temperature-0.7 rows are shown but the export is not theirs)."""
import json, re, subprocess, sys
sched = json.loads(subprocess.run([sys.executable, "-m", "adactl.cli", "export", "vllm", "--profile", sys.argv[2],
                                   "--max-batch", "64"], capture_output=True, text=True, check=True).stdout)
ranges = sched.get("num_speculative_tokens_per_batch_size") or sched
print("export:", ranges)
def k_at(b):
    for lo, hi, k in ranges:
        if lo <= b <= hi: return k
d = json.load(open(sys.argv[1]))
fixed = lambda n: re.fullmatch(r"no-spec|fixed-k\d+", n) is not None
kof = lambda n: 0 if n == "no-spec" else int(n.split("k")[1])
for t in sorted({r["temperature"] for r in d["records"]}):
    for b in sorted({r["batch_size"] for r in d["records"]}):
        fx = sorted((r for r in d["records"] if r["temperature"] == t and r["batch_size"] == b and fixed(r["controller"])),
                    key=lambda r: -r["tokens_per_s"])
        margin = fx[0]["tokens_per_s"] / fx[1]["tokens_per_s"] - 1
        tag = "decisive" if margin > 0.05 else "tie"
        print(f"t={t} b={b}: best {kof(fx[0]['controller'])} by {100*margin:.0f}% ({tag}); export k={k_at(b)}"
              + ("  MISMATCH" if margin > 0.05 and k_at(b) != kof(fx[0]['controller']) else ""))
