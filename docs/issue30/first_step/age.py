"""b-row steps, ratio k/plain: running rows fresh (16-256) or aged (250-384 tokens), alone or among 64 rows
(waiting rows aged like a profile's, up to 384).

    PYTHONPATH=. python docs/issue30/first_step/age.py 4 8   # batch, rounds
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
b = int(sys.argv[1]); reps = int(sys.argv[2]); ks = [0, 1, 2, 4]
def make(lengths):
    e = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=64, seed=0))
    e.reserve(len(lengths), max(lengths) + reps * 12 + 40)
    for n in lengths:
        e.add_request([rng.randrange(1, vocab) for _ in range(n)], sampling)
    while any(v.status != "running" for v in e.requests()):
        e.step(StepPlan(draft_len=0, prefill_budget=1024))
    return e
fresh = [rng.randint(16, 256) for _ in range(b)]
aged = [rng.randint(250, 384) for _ in range(b)]
waiting = [rng.randint(16, 384) for _ in range(64 - b)]
engines = {"fresh alone": make(fresh), "aged alone": make(aged), "fresh+64": make(fresh + waiting),
           "aged+64": make(aged + waiting)}
freeze_heap()
times = {(n, k): [] for n in engines for k in ks}
with torch.inference_mode():
    for r in range(reps + 1):
        for k in rng.sample(ks, len(ks)):
            for n in rng.sample(list(engines), len(engines)):
                e = engines[n]
                run = [v.request_id for v in e.requests()][:b] if len(e.requests()) > b else None
                t0 = time.perf_counter()
                e.draft_step(StepPlan(draft_len=k, prefill_budget=0, run=run)); e.verify()
                if r:
                    times[(n, k)].append(1000 * (time.perf_counter() - t0))
for n in engines:
    p = st.median(times[(n, 0)])
    print(f"b{b} {n:12s} plain {p:6.1f} ms  " + "  ".join(f"k{k} {st.median(times[(n, k)]) / p:.3f}" for k in ks[1:]))
