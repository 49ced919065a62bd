"""What padding the linear layers' small row counts saves (`runtime.row_padding`, this machine's
measured table since 2026-12-05; `runtime.target.whole_row_blocks`'s fixed rule before):
engine steps on the default pair (SmolLM2-135M and its feature draft, float32, 2 threads) at
the shapes whose forwards have 2 to 4 rows, with the padding on and off in turn step by step
on one engine (in pairs, the order alternating), so that drift hits both alike.

    PYTHONPATH=. python docs/issue31/small_rows.py --steps 24

Off means no layer is padded (`set_row_padding(target, NONE)`), the output layer included.
Prints the median step (ms) per shape and mode, and the median over pairs
of the ratio on ÷ off.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, row_padding
from adactl.runtime.models import load_pair

SHAPES = [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 0), (3, 0), (4, 0), (2, 1), (4, 1), (8, 0), (4, 2), (8, 1)]


def steps_on_off(target: torch.nn.Module, draft: torch.nn.Module, batch: int, k: int, pairs: int,
                 padded: row_padding.RowPadding) -> tuple[list[float], list[float]]:  # fmt: skip
    """Step times (ms) with the padding on and off, `pairs` of each, taken in turn."""
    times: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode():
        engine = Engine(target, draft, config=EngineConfig(max_batch_size=batch, seed=0))
        for i in range(batch):
            sampling = SamplingParams(max_new_tokens=(2 * pairs + 4) * (k + 1) + 8, stop_on_eos=False)
            engine.add_request(list(range(100 + i, 228 + i)), sampling)
        engine.step(StepPlan(draft_len=0, prefill_budget=256 * batch))
        for _ in range(2):  # warm-up
            engine.step(StepPlan(draft_len=k))
        for p in range(pairs):
            for on in (True, False) if p % 2 == 0 else (False, True):
                row_padding.set_row_padding(target, padded if on else row_padding.NONE)
                t0 = time.perf_counter()
                engine.step(StepPlan(draft_len=k))
                times[on].append(1000 * (time.perf_counter() - t0))
    row_padding.set_row_padding(target, padded)
    return times[True], times[False]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="pairs of steps (one on, one off) per shape")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pair = load_pair("default")
    target, draft = pair.target.model, pair.draft
    padded = row_padding.row_padding(target)
    print("| batch | k | rows of the verify forward | padded (ms) | unpadded (ms) | ratio (median of pairs) |")
    print("|---|---|---|---|---|---|")
    for b, k in SHAPES:
        on, off = steps_on_off(target, draft, b, k, args.steps, padded)
        ratio = statistics.median(x / y for x, y in zip(on, off))
        cells = f"{statistics.median(on):.0f} | {statistics.median(off):.0f} | {ratio:.2f}"
        print(f"| {b} | {k} | {b * (k + 1)} | {cells} |")


if __name__ == "__main__":
    main()
