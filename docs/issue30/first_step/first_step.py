"""Is the first step of a profiler round slow? b-row steps (subset of 64) after: a b64 step + pack,
pack alone, a b64 step alone, nothing.

    PYTHONPATH=. python docs/issue30/first_step/first_step.py 2 6   # batch, rounds
"""
import random, statistics as st, sys, time
import torch
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.models import load_pair, output_vocab_size

torch.set_num_threads(2)
pair = load_pair("default")
vocab = output_vocab_size(pair.target.model)
rng = random.Random(0)
sampling = SamplingParams(max_new_tokens=4096, stop_on_eos=False)
e = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=64, seed=0))
e.reserve(64, 384 + 128 + 400)
for _ in range(64):
    e.add_request([rng.randrange(1, vocab) for _ in range(rng.randint(16, 256))], sampling)
while any(v.status != "running" for v in e.requests()):
    e.step(StepPlan(draft_len=0, prefill_budget=1024))
freeze_heap()
b = int(sys.argv[1]) if len(sys.argv) > 1 else 2
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
def step(k, n):
    run = [v.request_id for v in e.requests()][:n] if n < 64 else None
    t0 = time.perf_counter()
    e.draft_step(StepPlan(draft_len=k, prefill_budget=0, run=run)); e.verify()
    return 1000 * (time.perf_counter() - t0)
variants = {"b64+pack": (True, True), "pack": (False, True), "b64": (True, False), "none": (False, False)}
res = {v: [[], [], [], []] for v in variants}
with torch.inference_mode():
    for r in range(reps + 1):
        for name in rng.sample(list(variants), len(variants)):
            big, pk = variants[name]
            if big:
                step(2, 64)  # drafts leave holes like a round's
            else:
                step(2, b)
            if pk:
                e.pack()
            ts = [step(0, b), step(0, b), step(1, b), step(0, b)]
            if r:
                for i, t in enumerate(ts):
                    res[name][i].append(t)
for name, cols in res.items():
    print(f"b{b} {name:9s} " + "  ".join(f"{lab}={st.median(c):6.1f}" for lab, c in zip(["P1st", "P2nd", "k1", "P4th"], cols)))
