"""Why does a profile price k-token steps at batch 1 about 6% dearer than held-out steps (make bench
run 38's checks: T(1) / T(0) 1.24 predicted, 1.17 measured; its own steps' medians 1.24)? The
profile's batch-1 row is its first row, which every batch size runs and which ages to 200-380
tokens, held among 64 rows; a check's is one new row of 16-256 tokens, alone. Plain and k-token
steps of one row, step by step in turn, in engines that differ in one thing each: the row's
context (alone: 64, 140, 300 tokens) and the rows held (`subset`: the 300-token row first among 64,
the others 16-384 tokens, run alone by `StepPlan.run`, as `adactl profile` measures its small
batches). Default pair, float32, KV reserved as the profiler's.

    PYTHONPATH=. python docs/issue30/b1_context/context.py --rounds 12
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
    parser.add_argument("--rounds", type=int, default=12, help="rounds (each: every k once, every engine)")
    parser.add_argument("--ks", default="0,1,2,4")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    pair = load_pair("default")
    vocab = output_vocab_size(pair.target.model)
    ks = [int(k) for k in args.ks.split(",")]
    rng = random.Random(0)
    sampling = SamplingParams(max_new_tokens=4096, stop_on_eos=False)
    b = args.batch

    def prompt(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    setups = {  # name: the prompts it holds (the first b run)
        "alone 64": [prompt(64) for _ in range(b)],
        "alone 140": [prompt(140) for _ in range(b)],
        "alone 300": [prompt(300) for _ in range(b)],
    }
    setups["subset 300 of 64"] = setups["alone 300"] + [prompt(rng.randint(16, 384)) for _ in range(64 - b)]
    engines = {}
    columns = 400 + (args.rounds + 1) * sum(k + 1 for k in ks) + 16
    with torch.inference_mode():
        for name, prompts in setups.items():
            e = Engine(pair.target.model, pair.speculator(with_companion=False),
                       config=EngineConfig(max_batch_size=64, seed=0))  # fmt: skip
            e.reserve(len(prompts), columns)
            for p in prompts:
                e.add_request(p, sampling)
            while any(v.status != "running" for v in e.requests()):
                e.step(StepPlan(draft_len=0, prefill_budget=1024))
            engines[name] = e
        freeze_heap()
        times: dict[tuple[str, int], list[float]] = {(name, k): [] for name in engines for k in ks}
        for rnd in range(args.rounds + 1):  # round 0: warm-up
            for k in rng.sample(ks, len(ks)):
                for name in rng.sample(list(engines), len(engines)):
                    e = engines[name]
                    run = [v.request_id for v in e.requests()][:b] if name.startswith("subset") else None
                    t0 = time.perf_counter()
                    e.draft_step(StepPlan(draft_len=k, prefill_budget=0, run=run))
                    e.verify()
                    if rnd:
                        times[(name, k)].append(1000 * (time.perf_counter() - t0))
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"batch {b}, {args.rounds} rounds, medians (ms) and ratio to plain decoding in the same engine")
    print("| engine | " + " | ".join(f"k = {k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for name in engines:
        cells = [f"{med[(name, k)]:.1f} ({med[(name, k)] / med[(name, 0)]:.3f})" for k in ks]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
