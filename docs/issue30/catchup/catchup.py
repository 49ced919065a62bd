"""A k=1 step at batch B right after P plain steps: draft_s by P."""
import time, random, torch
from adactl.runtime import Engine, EngineConfig, StepPlan, SamplingParams
from adactl.runtime.models import load_pair, output_vocab_size
from adactl.runtime.device import device_and_dtype
torch.set_num_threads(2)
dev, dt = device_and_dtype("cpu", "float32")
pair = load_pair("smollm2", "draft", None, dev, dt)
rng = random.Random(0)
for B in (4, 16, 64):
    eng = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=B, seed=0))
    eng.reserve(B, 600)
    V = output_vocab_size(pair.target.model)
    for _ in range(B):
        eng.add_request([rng.randrange(1, V) for _ in range(rng.randint(16, 200))], SamplingParams(max_new_tokens=4096, stop_on_eos=False))
    while any(v.status != "running" for v in eng.requests()):
        eng.draft_step(StepPlan(draft_len=0, prefill_budget=2048)); eng.verify()
    for P in (1, 2, 4, 8, 16, 32, 1, 32):
        for _ in range(P):
            eng.draft_step(StepPlan(draft_len=0, prefill_budget=0)); eng.verify()
        d = eng.draft_step(StepPlan(draft_len=1, prefill_budget=0)); o = eng.verify()
        # and a second k=1 step right after (catch-up of 1-2)
        d2 = eng.draft_step(StepPlan(draft_len=1, prefill_budget=0)); o2 = eng.verify()
        print(f"B={B:3d} after {P:2d} plain: k=1 draft {1000*o.draft_s:6.1f} ms verify {1000*o.verify_s:6.1f} | next k=1 draft {1000*o2.draft_s:6.1f} verify {1000*o2.verify_s:6.1f}", flush=True)
