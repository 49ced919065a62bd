"""Do waiting rows cost a small batch anything? Plain and k-token steps of b rows (the default pair,
float32, the KV reserved as the profiler's) in two engines side by side, step by step in turn:
`alone` holds only the b rows; `subset` holds 64 rows and runs the first b (`StepPlan.run`, the
others waiting), as `adactl profile` measures its small batches. Same prompts for the b rows.

    PYTHONPATH=. python docs/issue30/subset_rows/subset.py --batches 2,4,8 --steps 8
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.models import load_pair, output_vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="2,4,8")
    parser.add_argument("--steps", type=int, default=8, help="rounds (each: every k once, both engines)")
    parser.add_argument("--ks", default="0,1,2,4")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pair = load_pair("default")
    vocab = output_vocab_size(pair.target.model)
    ks = [int(k) for k in args.ks.split(",")]
    rng = random.Random(0)
    sampling = SamplingParams(max_new_tokens=4096, stop_on_eos=False)
    print("| batch | k | alone (ms) | subset of 64 (ms) | subset / alone | alone ratio to k=0 | subset ratio to k=0 |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for b in [int(x) for x in args.batches.split(",")]:
            prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(16, 256))] for _ in range(64)]
            engines = {}
            for name, n in (("alone", b), ("subset", 64)):
                e = Engine(pair.target.model, pair.speculator(with_companion=False),
                           config=EngineConfig(max_batch_size=64, seed=0))  # fmt: skip
                e.reserve(n, 256 + 8 + args.steps * sum(k + 1 for k in ks) * 2 + 64)
                for p in prompts[:n]:
                    e.add_request(p, sampling)
                while any(v.status != "running" for v in e.requests()):
                    e.step(StepPlan(draft_len=0, prefill_budget=1024))
                engines[name] = e
            freeze_heap()
            times = {(name, k): [] for name in engines for k in ks}
            for rnd in range(args.steps + 1):
                for k in rng.sample(ks, len(ks)):
                    for name in (("alone", "subset") if rnd % 2 else ("subset", "alone")):
                        e = engines[name]
                        run = [v.request_id for v in e.requests()][:b] if name == "subset" else None
                        t0 = time.perf_counter()
                        e.draft_step(StepPlan(draft_len=k, prefill_budget=0, run=run))
                        e.verify()
                        if rnd:
                            times[(name, k)].append(1000 * (time.perf_counter() - t0))
            med = {key: statistics.median(v) for key, v in times.items()}
            for k in ks:
                a, s = med[("alone", k)], med[("subset", k)]
                print(f"| {b} | {k} | {a:.1f} | {s:.1f} | {s / a:.2f} | {a / med[('alone', 0)]:.2f} | "
                      f"{s / med[('subset', 0)]:.2f} |", flush=True)  # fmt: skip
            for e in engines.values():
                e.close()


if __name__ == "__main__":
    main()
