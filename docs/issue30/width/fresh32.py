"""Fresh 32 rows: per round, plain and k-step times, the target cache's width (n_cols) and the rows' mean context."""
import random, sys, numpy as np, torch
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.models import load_pair, output_vocab_size
pair = load_pair("smollm2", "draft", "none", torch.device("cpu"), torch.float32)
vocab = output_vocab_size(pair.target.model); rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
b = int(sys.argv[1])
e = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=64, seed=0))
for _ in range(b):
    e.add_request([rng.randrange(1, vocab) for _ in range(rng.randint(16, 256))], SamplingParams(max_new_tokens=4096, stop_on_eos=False))
while any(v.status != "running" for v in e.requests()):
    e.step(StepPlan(draft_len=0, prefill_budget=512))
freeze_heap()
for k in (1, 1, 0, 1, 2, 4): e.step(StepPlan(draft_len=k, prefill_budget=0))
for r in range(12):
    row = {}
    for k in rng.sample([0, 1, 2, 4], 4):
        w = e.rows.target.n_cols
        e.draft_step(StepPlan(draft_len=k, prefill_budget=0)); o = e.verify()
        row[k] = (1000 * float(o.total_s), w)
    ctx = np.mean([v.context_len for v in e.requests()])
    print(f"round {r:2d} ctx {ctx:5.0f} " + " ".join(f"k{k}: {row[k][0]:5.0f} ms w{row[k][1]}" for k in (0, 1, 2, 4))
          + f" | k4/plain {row[4][0]/row[0][0]:.2f}")
