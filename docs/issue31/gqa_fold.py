"""What folding the query heads saves in masked grouped-query attention
(`runtime.attention.folded_sdpa`) against the CPU path before it (torch's SDPA with a mask and
`enable_gqa`, its CPU flash kernel sharing the key/value heads), on engine chain steps of the
default pair (SmolLM2-135M, 9 query on 3 key/value heads, and its feature draft; float32, 2
threads), the two taken in turn step by step on one engine (in pairs, the order alternating), so
that the machine's drift hits both alike.

    PYTHONPATH=. python docs/issue31/gqa_fold.py --steps 12 --prompt 256

Prints the median step (ms) per shape and mode, and the median over pairs of the ratio
fold ÷ enable_gqa. (transformers' own path, `repeat_kv`, is 5-30x slower in attention alone.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, attention
from adactl.runtime.models import load_pair

SHAPES = [(1, 4), (8, 2), (16, 1), (16, 4), (32, 1), (32, 4)]  # (batch, k)


def with_enable_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                    dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """The path before the fold: [B, H, T, D] from SDPA's own masked grouped attention."""
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=True
    )


def steps_both(target: torch.nn.Module, draft: torch.nn.Module, batch: int, k: int, pairs: int,
               prompt: int) -> dict[str, list[float]]:  # fmt: skip
    folded = attention.folded_sdpa
    modes = {"fold": folded, "enable_gqa": with_enable_gqa}
    times: dict[str, list[float]] = {m: [] for m in modes}
    with torch.inference_mode():
        engine = Engine(target, draft, config=EngineConfig(max_batch_size=batch, seed=0))
        for i in range(batch):
            sampling = SamplingParams(max_new_tokens=(2 * pairs + 4) * (k + 1) + 8, stop_on_eos=False)
            engine.add_request(list(range(100 + i, 100 + prompt + i)), sampling)
        engine.step(StepPlan(draft_len=0, prefill_budget=prompt * batch))
        for _ in range(2):  # warm-up
            engine.step(StepPlan(draft_len=k))
        try:
            for p in range(pairs):
                for name in list(modes) if p % 2 == 0 else list(modes)[::-1]:
                    attention.folded_sdpa = modes[name]  # type: ignore[assignment]
                    t0 = time.perf_counter()
                    engine.step(StepPlan(draft_len=k))
                    times[name].append(1000 * (time.perf_counter() - t0))
        finally:
            attention.folded_sdpa = folded  # type: ignore[assignment]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="pairs of steps (one each way) per shape")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pair = load_pair("default")
    print("| batch | k | fold (ms) | enable_gqa (ms) | fold ÷ enable_gqa (median of pairs) |")
    print("|---|---|---|---|---|")
    for b, k in SHAPES:
        t = steps_both(pair.target.model, pair.draft, b, k, args.steps, args.prompt)
        ratio = statistics.median(x / y for x, y in zip(t["fold"], t["enable_gqa"]))
        fold, before = statistics.median(t["fold"]), statistics.median(t["enable_gqa"])
        print(f"| {b} | {k} | {fold:.0f} | {before:.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
