"""Does a k-token step's cost ratio to a plain step move with the cache's width? (issue 30, T1)

`adactl profile --check` measured k = 1 at batch 64 at 1.64-1.71x a plain step where the profile's
own rounds measured 1.42-1.50x: the check's rows grow from new prompts with no pack (holes of
rejected drafts widen the padded rectangle), the profiler's rounds start from a packed cache.
Here one batch of new prompts (16-256 tokens, as the check's) runs rounds of whole-batch steps,
k = 0, 1, 2, 4 in a shuffled order, in two phases on new rows each: `grow` as the check (no pack),
`pack` as the profiler (a pack and an untimed step before each round). Per round: the span
(columns of the widest row), the mean context, and each k's ratio to the round's plain step.

  ADACTL_CACHE=<cache> PYTHONPATH=. python docs/issue30/span_ratio/span.py [BATCH] [ROUNDS] [SEED] [PROMPT]
"""

import random
import statistics
import sys

import torch

from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.device import device_and_dtype
from adactl.runtime.models import load_pair, output_vocab_size

B = int(sys.argv[1]) if len(sys.argv) > 1 else 64
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 20
SEED = int(sys.argv[3]) if len(sys.argv) > 3 else 1
PROMPT = int(sys.argv[4]) if len(sys.argv) > 4 else 0  # every prompt this long (0: 16-256 tokens)
KS = (0, 1, 2, 4)
torch.set_num_threads(2)
dev, dt = device_and_dtype("cpu", "float32")
pair = load_pair("smollm2", "draft", None, dev, dt)
freeze_heap()
engine = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=B, seed=SEED))
engine.reserve(B, max(256, PROMPT) + 12 * (ROUNDS + 2) + 16)
vocab, sampling = output_vocab_size(pair.target.model), SamplingParams(max_new_tokens=4096, stop_on_eos=False)
rng = random.Random(SEED)

for mode in ("grow", "pack"):
    for v in engine.requests():
        engine.cancel(v.request_id)
    engine.pop_finished()
    engine.pack()
    while len(engine.requests()) < B:
        engine.add_request([rng.randrange(1, vocab) for _ in range(PROMPT or rng.randint(16, 256))], sampling)
    while any(v.status != "running" for v in engine.requests()):
        engine.step(StepPlan(draft_len=0, prefill_budget=512))
    for k in (1, 1, 0, *KS):
        engine.step(StepPlan(draft_len=k, prefill_budget=0))
    ratios: dict[int, list[float]] = {k: [] for k in KS if k}
    print(f"{mode}: round  width  longest  context  plain_ms  " + "  ".join(f"k={k}" for k in KS if k), flush=True)
    for r in range(ROUNDS):
        if mode == "pack":
            engine.pack()
            engine.draft_step(StepPlan(draft_len=1, prefill_budget=0))
            engine.verify()
        ms, spans, contexts = {}, [], []
        for k in rng.sample(KS, len(KS)):
            drafts = engine.draft_step(StepPlan(draft_len=k, prefill_budget=0))
            outcome = engine.verify()
            ms[k] = 1000 * float(outcome.total_s)
            spans.append(int(drafts.context_len.max()))
            contexts.append(float(drafts.context_len.float().mean()))
        kv = engine.rows.target
        width = int(kv.used[: kv.n_rows].max())  # the padded rectangle's width: context, padding and holes
        for k in ratios:
            ratios[k].append(ms[k] / ms[0])
        print(f"{mode}: {r:5d} {width:6d} {max(spans):8d} {statistics.mean(contexts):8.1f} {ms[0]:9.1f}  "
              + "  ".join(f"{ms[k] / ms[0]:.3f}" for k in ratios), flush=True)
    half = ROUNDS // 2
    for k, xs in ratios.items():
        print(f"{mode}: k = {k}: median ratio {statistics.median(xs):.3f}; first half {statistics.median(xs[:half]):.3f}, "
              f"second half {statistics.median(xs[half:]):.3f}", flush=True)
