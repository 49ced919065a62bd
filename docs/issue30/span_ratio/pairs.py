"""How fast does a step's time wander on this machine? Alternating plain and k-token steps at one
batch size (new prompts of 16-256 tokens): the spread of consecutive plain steps against all
plain steps, and a k-token step's ratio to its two plain neighbours against its ratio to a plain
step a few seconds away (a profiler round's spacing). If steps a second apart share most of the
wander, pricing a k-token step against its neighbours halves a round's noise.

  ADACTL_CACHE=<cache> PYTHONPATH=. python docs/issue30/span_ratio/pairs.py [BATCH] [K] [PAIRS] [SEED]
"""

import math
import random
import statistics
import sys

import numpy as np
import torch

from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.device import device_and_dtype
from adactl.runtime.models import load_pair, output_vocab_size

B = int(sys.argv[1]) if len(sys.argv) > 1 else 64
K = int(sys.argv[2]) if len(sys.argv) > 2 else 1
PAIRS = int(sys.argv[3]) if len(sys.argv) > 3 else 40
SEED = int(sys.argv[4]) if len(sys.argv) > 4 else 1
torch.set_num_threads(2)
dev, dt = device_and_dtype("cpu", "float32")
pair = load_pair("smollm2", "draft", None, dev, dt)
freeze_heap()
engine = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=B, seed=SEED))
engine.reserve(B, 256 + (K + 2) * (PAIRS + 4) + 16)
vocab, sampling = output_vocab_size(pair.target.model), SamplingParams(max_new_tokens=4096, stop_on_eos=False)
rng = random.Random(SEED)
while len(engine.requests()) < B:
    engine.add_request([rng.randrange(1, vocab) for _ in range(rng.randint(16, 256))], sampling)
while any(v.status != "running" for v in engine.requests()):
    engine.step(StepPlan(draft_len=0, prefill_budget=512))
for k in (1, 1, 0, K):
    engine.step(StepPlan(draft_len=k, prefill_budget=0))
plain, drafted = [], []
for i in range(PAIRS):
    plain.append(1000 * float(engine.step(StepPlan(draft_len=0, prefill_budget=0)).total_s))
    drafted.append(1000 * float(engine.step(StepPlan(draft_len=K, prefill_budget=0)).total_s))
plain.append(1000 * float(engine.step(StepPlan(draft_len=0, prefill_budget=0)).total_s))
p, d = np.log(plain), np.log(drafted)
print(f"batch {B}, k = {K}, {PAIRS} pairs: plain {statistics.median(plain):.1f} ms, k-step {statistics.median(drafted):.1f} ms")
print(f"log sd of plain steps {np.std(p, ddof=1):.3f}; of consecutive plain steps' difference / sqrt 2 "
      f"{np.std(np.diff(p), ddof=1) / math.sqrt(2):.3f} (equal: no memory; smaller: the wander is slow)")
neighbours = d - (p[:-1] + p[1:]) / 2
away = d[: -3] - p[3:-1]  # a plain step three pairs (about six steps) later
print(f"ratio to neighbours: median {math.exp(np.median(neighbours)):.3f}, log sd {np.std(neighbours, ddof=1):.3f}")
print(f"ratio to a plain step 6 steps away: median {math.exp(np.median(away)):.3f}, log sd {np.std(away, ddof=1):.3f}")
print("steps: " + " ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(plain, drafted)))
