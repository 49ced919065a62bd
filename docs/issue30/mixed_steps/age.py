"""Does a k = 1 step cost more as its run ages while a plain step does not (probe.py, part 1)?
Batch B rows of ShareGPT prompts, long outputs; in blocks of 4 steps, two k = 1 steps then two
plain ones, 15 blocks: per block the KV columns (`n_cols`, holes included), the widest row's
real tokens, and the second k = 1 and second plain step's verify ms.

  PYTHONPATH=. python docs/issue30/mixed_steps/age.py [BATCH] [TEMPERATURE]
"""

import math
import sys

import torch

from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan
from adactl.runtime.device import device_and_dtype
from adactl.runtime.models import load_pair
from adactl.workloads import spec_prompts

B = int(sys.argv[1]) if len(sys.argv) > 1 else 16
TEMP = float(sys.argv[2]) if len(sys.argv) > 2 else 0.7
torch.set_num_threads(2)
dev, dt = device_and_dtype("cpu", "float32")
pair = load_pair("smollm2", "draft", None, dev, dt)
prompts = spec_prompts(pair.tokenizer, "sharegpt", B, 256)
eng = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=B, seed=0))
eng.reserve(B, math.ceil((max(map(len, prompts)) + 200) * 4 / 3))
for i, p in enumerate(prompts):
    eng.add_request(p, SamplingParams(150, temperature=TEMP, seed=i), request_id=f"r{i}")
eng.draft_step(StepPlan(draft_len=0, prefill_budget=1 << 16))
eng.verify()
kv = eng.rows.target
print("block n_cols widest | k=1 draft verify | plain verify  (ms)")
for block in range(15):
    out = []
    for k in (1, 1, 0, 0):
        eng.draft_step(StepPlan(draft_len=k, prefill_budget=0))
        out.append(eng.verify())
    widest = int(kv.lengths[: kv.n_rows].max())
    print(
        f"{block:5d} {kv.n_cols:6d} {widest:6d} | {1e3 * out[1].draft_s:6.1f} {1e3 * out[1].verify_s:6.1f} "
        f"| {1e3 * out[3].verify_s:6.1f}",
        flush=True,
    )
