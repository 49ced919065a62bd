"""Does switching the draft length from step to step cost the engine anything? Three engines of the
default pair (float32, 8 rows each, the same prompts, greedy, KV reserved as the bench's), step by step
in turn: one always drafts k = 1, one always k = 2, one draws k = 2 with probability --p2 each step (as
`goodput` mixing a k = 1 / k = 2 tie does). Each step's time is grouped by its k and by the k of that
engine's previous step, medians.

    ADACTL_CACHE=<a make bench run's cache> PYTHONPATH=. python docs/issue30/switching/switching.py --steps 80
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.models import load_pair
from adactl.workloads import spec_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--p2", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    pair = load_pair("default")
    prompts = spec_prompts(pair.target.tokenizer, "sharegpt", args.batch, 256)
    rng = random.Random(0)
    sampling = SamplingParams(max_new_tokens=4096, stop_on_eos=False, temperature=0.0)
    engines = {}
    with torch.inference_mode():
        for name in ("k=1", "k=2", "mixed"):
            e = Engine(pair.target.model, pair.speculator(with_companion=False),
                       config=EngineConfig(max_batch_size=args.batch, seed=0))  # fmt: skip
            e.reserve(args.batch, 256 + 4 * args.steps + 64)
            for p in prompts:
                e.add_request(p, sampling)
            e.step(StepPlan(draft_len=0, prefill_budget=4096))
            engines[name] = e
        freeze_heap()
        last = dict.fromkeys(engines, 1)
        times: dict[tuple[str, int, int], list[float]] = {}
        for i in range(args.steps + 4):
            for name in rng.sample(list(engines), len(engines)):
                k = {"k=1": 1, "k=2": 2}.get(name) or (2 if rng.random() < args.p2 else 1)
                e = engines[name]
                t0 = time.perf_counter()
                e.draft_step(StepPlan(draft_len=k, prefill_budget=0))
                e.verify()
                if i >= 4:  # warm-up
                    times.setdefault((name, k, last[name]), []).append(1000 * (time.perf_counter() - t0))
                last[name] = k
    print(f"batch {args.batch}, {args.steps} steps an engine, p(k = 2) in the mixed engine {args.p2}; ms, medians (n)")
    print("| engine | k | after k = 1 | after k = 2 | all |")
    print("|---|---|---|---|---|")
    for name in engines:
        for k in (1, 2):
            cells = []
            for prev in (1, 2):
                v = times.get((name, k, prev), [])
                cells.append(f"{statistics.median(v):.1f} ({len(v)})" if v else "-")
            both = times.get((name, k, 1), []) + times.get((name, k, 2), [])
            if both:
                print(f"| {name} | {k} | {cells[0]} | {cells[1]} | {statistics.median(both):.1f} ({len(both)}) |")
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
