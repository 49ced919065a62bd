"""A/B of the engine's row padding (since 2026-12-05 the table measured on this machine,
`adactl.runtime.row_padding`; the output layer's fixed blocks of 4 when this was written) on
the default pair, fp32, CPU: engine steps on held-out ShareGPT prompts, 40 new tokens per
request, padded and unpadded interleaved in 3 rounds; prints tokens/s and the median ratio.

    python docs/issue20_default_switch/ab_row_padding.py   # about 3 minutes on 2 cores
"""

import statistics
import time

from adactl.runtime import Engine, SamplingParams, StepPlan, load_pair, row_padding
from adactl.workloads import chat_prompts, read_sharegpt

CASES = [(1, 1), (1, 2), (1, 4), (2, 0), (3, 0)]  # (batch, draft length)

pair = load_pair("smollm2", "draft", None, "cpu", "float32")
prompts = chat_prompts(pair.tokenizer, 8, 256, read_sharegpt(), held_out=True)
padded = row_padding.row_padding(pair.target.model)


def tokens_per_s(batch: int, k: int, pad: bool) -> float:
    row_padding.set_row_padding(pair.target.model, padded if pad else row_padding.NONE)
    engine = Engine(pair.target.model, pair.draft, pair.tokenizer)
    for p in prompts[:batch]:
        engine.add_request(p, SamplingParams(max_new_tokens=40, stop_on_eos=False))
    engine.step(StepPlan(draft_len=0))  # the prefill, not timed
    emitted, start = 0, time.perf_counter()
    while engine.has_unfinished():
        emitted += engine.step(StepPlan(draft_len=k)).tokens_emitted
    return emitted / (time.perf_counter() - start)


runs: dict[tuple[int, int, bool], list[float]] = {}
for _ in range(3):
    for batch, k in CASES:
        for pad in (False, True):
            runs.setdefault((batch, k, pad), []).append(tokens_per_s(batch, k, pad))
row_padding.set_row_padding(pair.target.model, padded)
for batch, k in CASES:
    off, on = runs[(batch, k, False)], runs[(batch, k, True)]
    ratios = [b / a for a, b in zip(off, on)]
    print(f"batch {batch} k {k}: unpadded {statistics.median(off):.1f} tok/s, padded {statistics.median(on):.1f}, "
          f"ratio {statistics.median(ratios):.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios)})")
