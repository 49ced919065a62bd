"""Why a run's last steps cost more than its whole-batch ones (make bench run 56, b16_actions):
the engine's bookkeeping timed inside each step of a one-wave run, and mixed-length steps timed
mid-run, where no row finishes.

  PYTHONPATH=. python docs/issue30/mixed_steps/probe.py [BATCH] [TEMPERATURE] [TOKENS]

Part 1, a bench-like wave (BATCH ShareGPT prompts, TOKENS new tokens each, fixed k = 1 to the end, then
plain decoding to the end on the same prompts): per step its rows, drafting rows, draft and verify ms, and
inside them the ms of `Rows.arrange` (rows changing segment), `Rows.drop` (finished rows leaving) and the
KV caches' `_compact` and `_reallocate`, with the KV columns moved.
Part 2, mid-run (300 new tokens a row: nothing finishes in its 80 steps): five rounds of each kind, three
steps in a row, the last two timed: every row k = 1; all but one row (the last in cache order, so nothing
moves) k = 1; all but one row (the first, so two rows move) k = 1; half the rows k = 1; plain.
"""

import math
import statistics
import sys
import time
from collections import defaultdict

import torch

from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan
from adactl.runtime.device import device_and_dtype
from adactl.runtime.kv import BatchKV
from adactl.runtime.models import load_pair
from adactl.runtime.rows import Rows
from adactl.workloads import spec_prompts

B = int(sys.argv[1]) if len(sys.argv) > 1 else 16
TEMP = float(sys.argv[2]) if len(sys.argv) > 2 else 0.7
TOKENS = int(sys.argv[3]) if len(sys.argv) > 3 else 32
torch.set_num_threads(2)
dev, dt = device_and_dtype("cpu", "float32")
pair = load_pair("smollm2", "draft", None, dev, dt)
prompts = spec_prompts(pair.tokenizer, "sharegpt", B, 256)

spent: dict[str, float] = defaultdict(float)


def timed(cls, name):
    inner = getattr(cls, name)

    def wrapper(self, *a, **kw):
        t = time.perf_counter()
        try:
            return inner(self, *a, **kw)
        finally:
            spent[name] += time.perf_counter() - t

    setattr(cls, name, wrapper)


for cls, name in ((Rows, "arrange"), (Rows, "drop"), (BatchKV, "_compact"), (BatchKV, "_reallocate")):
    timed(cls, name)


def engine(tokens):
    config = EngineConfig(max_batch_size=B, seed=0)
    eng = Engine(pair.target.model, pair.speculator(with_companion=False), config=config)
    eng.reserve(B, math.ceil((max(map(len, prompts)) + tokens + 5) * 4 / 3))  # as the bench reserves (`kv_columns`)
    for i, p in enumerate(prompts):
        eng.add_request(p, SamplingParams(tokens, temperature=TEMP, seed=i), request_id=f"r{i}")
    eng.draft_step(StepPlan(draft_len=0, prefill_budget=1 << 16))
    eng.verify()
    return eng


def step(eng, draft_len):
    spent.clear()
    eng.draft_step(StepPlan(draft_len=draft_len, prefill_budget=0))
    o = eng.verify()
    return o, dict(spent)


print(f"part 1: one wave, batch {B}, temperature {TEMP}, {TOKENS} tokens", flush=True)
for k in (1, 0):
    eng, n = engine(TOKENS), 0
    print(f"-- fixed k = {k}")
    print(" step rows draft | draft_ms verify_ms | arrange drop compact realloc ms | moved catchup")
    while any(v.status == "running" for v in eng.requests()):
        o, s = step(eng, k)
        n += 1
        drafting = int((o.drafted > 0).sum())
        print(
            f" {n:4d} {len(o.request_ids):4d} {drafting:5d} | {1e3 * o.draft_s:8.1f} {1e3 * o.verify_s:9.1f} "
            f"| {1e3 * s.get('arrange', 0):7.1f} {1e3 * s.get('drop', 0):4.1f} {1e3 * s.get('_compact', 0):7.1f} "
            f"{1e3 * s.get('_reallocate', 0):7.1f} | {o.moved_tokens:5d} {o.catchup_tokens:7d}",
            flush=True,
        )

print("part 2: mid-run, nothing finishes", flush=True)
eng = engine(300)
for _ in range(4):
    step(eng, 1)
kinds = {
    "all k=1": lambda ids: 1,
    "last row plain": lambda ids: {i: 1 for i in ids[:-1]},
    "first row plain": lambda ids: {i: 1 for i in ids[1:]},
    "half k=1": lambda ids: {i: 1 for i in ids[: len(ids) // 2]},
    "plain": lambda ids: 0,
}
times = defaultdict(list)
for _ in range(5):
    for name, plan in kinds.items():
        for rep in range(3):
            ids = [r.request_id for r in eng.rows.running]
            o, s = step(eng, plan(ids))
            if rep:
                times[name].append((o.draft_s, o.verify_s, s.get("arrange", 0), o.moved_tokens))
for name, xs in times.items():
    med = [statistics.median(x[i] for x in xs) for i in range(4)]
    print(
        f" {name:16s} draft {1e3 * med[0]:6.1f} verify {1e3 * med[1]:6.1f} total {1e3 * (med[0] + med[1]):6.1f} ms "
        f"(arrange {1e3 * med[2]:.1f} ms, moved {med[3]:.0f} columns)",
        flush=True,
    )
