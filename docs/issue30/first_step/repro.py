"""Profiler raw cells vs held-out check, same process, same row-padding table.

    PYTHONPATH=. python docs/issue30/first_step/repro.py 64 300   # max batch, budget (s)
"""
import sys, statistics as st, json
import numpy as np, torch
torch.set_num_threads(2)
from adactl import profiler as P
from adactl.runtime import Engine, EngineConfig, freeze_heap
from adactl.runtime.models import load_pair, output_vocab_size
from adactl.estimators.step_cost import StepCostProfile
max_batch, budget = int(sys.argv[1]), float(sys.argv[2])
variant = sys.argv[3] if len(sys.argv) > 3 else "base"
pair = load_pair("default")
freeze_heap()
engine = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=max_batch, seed=0))
engine.reserve(max_batch, P.MAX_CONTEXT + 128)
if variant == "nopack":
    engine.pack = lambda: False
torch.manual_seed(0)
shapes, seconds = P.measure(engine, pair.device, output_vocab_size(pair.target.model), max_batch, budget, 6, 0, progress=False)
cells = {}
for s, y in zip(shapes, seconds):
    r, k = s.rows, s.max_draft
    if s.prefill_tokens or s.draft_tokens != r * k or s.verify_computed != r * (k + 1):
        continue
    cells.setdefault((r, k), []).append(1000 * float(sum(y)))
fp = P.fingerprint(pair.model_ids, pair.device, pair.dtype)
prof = StepCostProfile.from_steps(fp, shapes, seconds, {})
batches = sorted({b for b, _ in cells})
recs = P.check_ratios(pair, prof.model(refine=False), batches, [1, 2, 4], rounds=6, seed=1, progress=False)
for r in recs:
    b, k = r["batch_size"], r["k"]
    p, kk = st.median(cells[(b, 0)]), st.median(cells[(b, k)])
    print(f"b{b:2d} k{k} profile plain {p:6.1f} k {kk:6.1f} ratio {kk/p:.3f} (n={len(cells[(b,0)])}) | held-out plain {r['plain_ms']:6.1f} k {r['plain_ms']*r['measured_ratio']:6.1f} ratio {r['measured_ratio']:.3f} +-{r['stderr']:.3f} | raw err {kk/p/r['measured_ratio']-1:+.3f} fit err {r['error']:+.3f}")
