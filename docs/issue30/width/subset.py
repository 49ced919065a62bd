"""k-step / plain ratio at batch b: b rows alone in an engine, against the first b of 64 rows (the rest waiting).

    python docs/issue30/width/subset.py 32
"""
import random, sys, time, numpy as np, torch
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.models import load_pair, output_vocab_size
torch.manual_seed(0)
pair = load_pair("smollm2", "draft", "none", torch.device("cpu"), torch.float32)
vocab = output_vocab_size(pair.target.model)
rng = random.Random(0)
sampling = SamplingParams(max_new_tokens=4096, stop_on_eos=False)
def make(n):
    e = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=64, seed=0))
    for _ in range(n):
        e.add_request([rng.randrange(1, vocab) for _ in range(rng.randint(16, 256))], sampling)
    while any(v.status != "running" for v in e.requests()):
        e.step(StepPlan(draft_len=0, prefill_budget=512))
    return e
freeze_heap()
b = int(sys.argv[1]); ks = [0, 1, 2, 4]
alone, shared = make(b), make(64)
def timed(e, k, run):
    e.draft_step(StepPlan(draft_len=k, prefill_budget=0, run=run)); o = e.verify(); return float(o.total_s)
for e in (alone, shared):
    for k in (1, 0, 2, 4): timed(e, k, None)
res = {"alone": {k: [] for k in ks}, "shared": {k: [] for k in ks}}
for r in range(12):
    for name, e in rng.sample([("alone", alone), ("shared", shared)], 2):
        run = None if name == "alone" else [v.request_id for v in e.requests()][:b]
        for k in rng.sample(ks, len(ks)):
            res[name][k].append(timed(e, k, run))
for name in res:
    plain = np.array(res[name][0])
    ctx = np.mean([v.context_len for v in (alone if name == "alone" else shared).requests()][:b])
    print(name, f"b={b} plain {1000*np.median(plain):.0f} ms ctx {ctx:.0f}", " ".join(
        f"k{k}: {np.exp(np.median(np.log(np.array(res[name][k]) / plain))):.3f}" for k in ks[1:]))
