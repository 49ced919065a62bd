"""Replay experiment (issue 30): `goodput` as a server runs it, its acceptance estimate fed by
its own steps alone, against `goodput` in the bench, where every run of a temperature feeds it.

For each seed: the fixed configurations in one replay, `goodput` alone in another, and all of them
together in a third; then goodput ÷ the best fixed k per cell, alone and shared. `--variant`
patches the controller first (`docs/issue30/alone_replay/variants.py`).

    PYTHONPATH=. python docs/issue30/alone_replay/run.py [--variant NAME] [--seeds 1,2,3,4]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

FIXED = "no-spec;fixed-k1;fixed-k2;fixed-k4"
PROFILE = "docs/issue30/make_bench_run8/profile_plain.json"
BATCHES = "1,2,4,8,16,32,64"
VARIANT = ""


def replay(controllers: str, seed: int, out: Path) -> dict:
    argv = [sys.executable, str(HERE / "cli.py"), VARIANT, "bench", "spec", "--replay", "--profile", PROFILE,
            "--batches", BATCHES, "--max-new-tokens", "32", "--controllers", controllers, "--rounds", "2",
            "--seed", str(seed), "--out", str(out)]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True)  # a process each: nothing learned carries over
    rate: dict = {}
    for r in json.loads((out / "spec_replay.json").read_text())["records"]:
        rate[(r["temperature"], r["batch_size"], r["controller"])] = (r["tokens_per_s"], r["mean_accepted_len"])
    return rate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="")
    p.add_argument("--seeds", default="1,2,3,4")
    a = p.parse_args()
    global VARIANT
    VARIANT = a.variant
    ratios: dict = {"alone": {}, "shared": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, a.seeds.split(",")):
            fixed = replay(FIXED, seed, Path(tmp) / f"f{seed}")
            alone = replay("goodput", seed, Path(tmp) / f"a{seed}")
            shared = replay(FIXED + ";goodput", seed, Path(tmp) / f"s{seed}")
            for t, b, c in fixed:
                if c != "no-spec":
                    continue
                best = max(v[0] for (t2, b2, c2), v in fixed.items() if (t2, b2) == (t, b) and c2 in FIXED.split(";"))
                ratios["alone"].setdefault((t, b), []).append(alone[(t, b, "goodput")][0] / best)
                ratios["shared"].setdefault((t, b), []).append(shared[(t, b, "goodput")][0] / best)
    print(f"variant {a.variant or 'landed'}, seeds {a.seeds}: goodput ÷ best fixed k, mean over seeds")
    for how, cells in ratios.items():
        for t in sorted({t for t, _ in cells}):
            row = [statistics.mean(cells[(t, b)]) for b in sorted(b for t2, b in cells if t2 == t)]
            print(f"  {how:6s} t={t}: " + " ".join(f"{x:.3f}" for x in row))
        every = [x for xs in cells.values() for x in xs]
        print(f"  {how:6s} cells under 0.97: {sum(x < 0.97 for x in every)} of {len(every)}, "
              f"lowest {min(every):.3f}, mean {statistics.mean(every):.4f}")


if __name__ == "__main__":
    main()
