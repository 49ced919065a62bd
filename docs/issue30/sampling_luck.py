"""How much of a sampled `bench spec` cell is luck: fixed k = 1 and `goodput` on the default
pair at one batch size, temperature 0.7, 32 new tokens, interleaved step by step as the bench
runs them, over `--seeds` sampling seeds (100, 101, ...); per seed each run's mean accepted
length, steps and tokens/s, and over the seeds the spread of the accepted length and of
goodput ÷ fixed k = 1.

    PYTHONPATH=. python docs/issue30/sampling_luck.py [--batch 4] [--seeds 10]
"""

import argparse
import statistics
from dataclasses import replace
from functools import partial

from tqdm import tqdm

from adactl.bench import spec
from adactl.runtime import freeze_heap


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seeds", type=int, default=10)
    a = p.parse_args()
    args = spec.SpecSettings(batches=[a.batch], temperatures=[0.7], max_new_tokens=32).resolved()
    target, draft, pair, prompts, ctx, _ = spec._load(args)
    engines = spec.Engines(target, draft, pair)
    freeze_heap()
    names = ["fixed-k1", "goodput"]
    accepted: dict[str, list[float]] = {n: [] for n in names}
    ratios = []
    for s in range(a.seeds):
        drawn = replace(args, seed=100 + s)
        runs = [partial(spec.start_one, n, engines, prompts[: a.batch], 0.7, ctx, drawn, tqdm(disable=True))
                for n in names]  # fmt: skip
        res = spec.interleaved(runs, seed=s)
        for r in res:
            accepted[r["controller"]].append(r["mean_accepted_len"])
        ratios.append(res[1]["tokens_per_s"] / res[0]["tokens_per_s"])
        print(f"seed {100 + s}: " + "; ".join(f"{r['controller']} accepted {r['mean_accepted_len']:.3f}, "
                                              f"{r['steps']} steps, {r['tokens_per_s']:.1f} tokens/s" for r in res))
    for n in names:
        xs = accepted[n]
        print(f"{n}: accepted {min(xs):.3f}-{max(xs):.3f}, mean {statistics.mean(xs):.3f}, "
              f"sd {100 * statistics.pstdev(xs) / statistics.mean(xs):.1f}%")
    print(f"goodput / fixed-k1 per seed {min(ratios):.2f}-{max(ratios):.2f}, mean {statistics.mean(ratios):.3f}")


if __name__ == "__main__":
    main()
