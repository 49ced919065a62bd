"""A step-cost profile of the default pair measured with R rounds at every batch size (`measure`'s
`min_rounds` = `reps` = R, a budget that does not cut them), to set beside the 3-4 rounds the
default 300 s budget gave on a slow VM; saved to OUT for `adactl profile --check --profile OUT`.

  ADACTL_CACHE=<cache> PYTHONPATH=. python docs/issue30/check_20261207/rounds.py R OUT
"""

import sys
import time

import torch

from adactl.estimators.step_cost import StepCostProfile
from adactl.profiler import MAX_CONTEXT, engine_version, fingerprint, measure
from adactl.runtime import Engine, EngineConfig, freeze_heap
from adactl.runtime.models import load_pair, output_vocab_size
from adactl.runtime.device import device_and_dtype

R, OUT = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(2)
dev, dt = device_and_dtype("cpu", "float32")
pair = load_pair("smollm2", "draft", None, dev, dt)
freeze_heap()
engine = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=64, seed=0))
engine.reserve(64, MAX_CONTEXT + 128)
t0 = time.perf_counter()
torch.manual_seed(0)
stats: dict[str, int] = {}
shapes, seconds = measure(engine, pair.device, output_vocab_size(pair.target.model), 64, 3600.0, R, 0, stats=stats,
                          min_rounds=R)  # fmt: skip
meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "profile_s": round(time.perf_counter() - t0, 1),
        "max_batch": 64, "reps": R, "min_rounds": R, "seed": 0, "steps": len(shapes),
        "steps_left_out_capturing": stats["captures"], "engine": engine_version()}  # fmt: skip
StepCostProfile.from_steps(fingerprint(pair.model_ids, pair.device, pair.dtype), shapes, seconds, meta).save(OUT)
print(f"{OUT}: {len(shapes)} steps in {meta['profile_s']} s")
