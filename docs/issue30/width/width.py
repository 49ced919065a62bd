"""Plain and k-step cost at batch 32: rows of short contexts, with and without one long row (the cache's width)."""
import random, numpy as np, torch
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.models import load_pair, output_vocab_size
pair = load_pair("smollm2", "draft", "none", torch.device("cpu"), torch.float32)
vocab = output_vocab_size(pair.target.model); rng = random.Random(0)
sampling = SamplingParams(max_new_tokens=4096, stop_on_eos=False)
def make(long):
    e = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=64, seed=0))
    for i in range(32):
        e.add_request([rng.randrange(1, vocab) for _ in range(long if (i == 0 and long) else rng.randint(16, 256))], sampling)
    while any(v.status != "running" for v in e.requests()):
        e.step(StepPlan(draft_len=0, prefill_budget=1024))
    return e
freeze_heap()
es = {"short": make(0), "long800": make(800)}
def timed(e, k):
    d = e.draft_step(StepPlan(draft_len=k, prefill_budget=0)); o = e.verify(); return float(o.total_s), int(d.context_len.sum())
for e in es.values():
    for k in (1, 0, 2, 4): timed(e, k)
res = {n: {k: [] for k in (0, 1, 4)} for n in es}
for r in range(10):
    for n in rng.sample(list(es), 2):
        for k in rng.sample([0, 1, 4], 3):
            res[n][k].append(timed(es[n], k)[0])
for n, e in es.items():
    plain = np.array(res[n][0]); ctx = sum(v.context_len for v in e.requests())
    print(n, f"sum ctx {ctx}, plain {1000*np.median(plain):.0f} ms", " ".join(f"k{k}: {np.median(np.array(res[n][k])/plain):.3f} ({1000*np.median(res[n][k]):.0f} ms)" for k in (1, 4)))
