"""Garbage-collection pauses inside `bench spec`'s timed steps, with and without `freeze_heap`:
three plain-decoding runs of the default pair at one batch size, interleaved step by step as
the bench runs them, `--rounds` rounds; every collection timed (`gc.callbacks`) by generation;
and each round's tokens/s of runs 2 and 3 over run 1's (the same action: 1 but for noise).

    PYTHONPATH=. python docs/issue30/gc_pauses.py [--freeze] [--batch 16] [--rounds 8]
"""

import argparse
import gc
import statistics
import time
from collections import defaultdict
from functools import partial

from tqdm import tqdm

from adactl.bench import spec
from adactl.runtime import freeze_heap


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--freeze", action="store_true")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    a = p.parse_args()
    pauses: dict[int, list[float]] = defaultdict(list)
    began = [0.0]

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - began[0])

    args = spec.SpecSettings(batches=[a.batch], temperatures=[0.0], max_new_tokens=32).resolved()
    target, draft, pair, prompts, ctx, _ = spec._load(args)
    engines = spec.Engines(target, draft, pair)
    if a.freeze:
        freeze_heap()
    print(f"objects the collector walks: {len(gc.get_objects())}, frozen: {gc.get_freeze_count()}")
    gc.callbacks.append(timed)
    ratios = []
    for r in range(a.rounds):

        def start(i: int) -> spec.Serving:
            run = spec.start_one("no-spec", engines, prompts[: a.batch], 0.0, ctx, args, tqdm(disable=True))
            run.label["controller"] = f"no-spec-{i}"  # request ids of their own
            return run

        rates = [x["tokens_per_s"] for x in spec.interleaved([partial(start, i) for i in range(3)], seed=r)]
        ratios += [rates[1] / rates[0], rates[2] / rates[0]]
        print(f"round {r + 1}: tokens/s {' / '.join(f'{x:.1f}' for x in rates)}")
    gc.callbacks.remove(timed)
    for g in sorted(pauses):
        xs = pauses[g]
        print(f"generation {g}: {len(xs)} collections, longest {1000 * max(xs):.1f} ms, all {1000 * sum(xs):.0f} ms")
    print(f"runs 2 and 3 over run 1, {len(ratios)} ratios: sd {statistics.pstdev(ratios):.4f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
