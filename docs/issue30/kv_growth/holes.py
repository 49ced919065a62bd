"""Bench-like static runs (B requests of the bench's prompts, 32 new tokens, fixed k, greedy): share of step time
in compaction and KV reallocation (and their causes), and the target cache's width over its longest row (holes).

    python docs/issue30/kv_growth/holes.py 64x1,64x4 [COL_HEADROOM MIN_COL_GROWTH]
"""
import sys, time, collections, numpy as np, torch
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime import kv as kvmod
from adactl.runtime.models import load_pair
from adactl.workloads import spec_prompts
spent = collections.defaultdict(float); calls = collections.defaultdict(int)
import traceback
reasons = collections.Counter()
f0 = kvmod.BatchKV._reallocate
def r(self, rows, cols):
    who = "maybe_compact" if any(fr.name == "maybe_compact" for fr in traceback.extract_stack(limit=6)) else "ensure"
    kind = ("rows" if rows != self.capacity[0] else "") + ("cols" if cols != self.capacity[1] else "")
    reasons[(who, kind, "up" if rows * cols > self.capacity[0] * self.capacity[1] else "down")] += 1
    return f0(self, rows, cols)
kvmod.BatchKV._reallocate = r
from adactl.runtime.kv import KVConfig
KV = KVConfig(col_headroom=float(sys.argv[2]), min_col_growth=int(sys.argv[3])) if len(sys.argv) > 3 else KVConfig()
for name in ("_compact", "_reallocate"):
    f = getattr(kvmod.BatchKV, name)
    def g(self, *a, _f=f, _n=name, **kw):
        t = time.perf_counter(); r = _f(self, *a, **kw); spent[_n] += time.perf_counter() - t; calls[_n] += 1; return r
    setattr(kvmod.BatchKV, name, g)
pair = load_pair("smollm2", "draft", "none", torch.device("cpu"), torch.float32)
prompts = spec_prompts(pair.tokenizer, "sharegpt", 64, 256)
freeze_heap()
for cell in sys.argv[1].split(","):
    B, k = map(int, cell.split("x"))
    e = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=B, seed=0, kv=KV))
    for p in prompts[:B]: e.add_request(p, SamplingParams(max_new_tokens=32))
    e.step(StepPlan(draft_len=0, prefill_budget=100000))
    spent.clear(); calls.clear(); reasons.clear(); total = 0.0; waste = []; steps = 0
    while e.has_unfinished():
        kv = e.rows.target
        if kv.n_rows:
            waste.append(1 - kv.lengths[:kv.n_rows].max() / max(kv.n_cols, 1))
        t = time.perf_counter(); e.step(StepPlan(draft_len=k, prefill_budget=0)); total += time.perf_counter() - t; steps += 1
    print(f"B{B} k{k}: {steps} steps, {total:.2f} s; compaction {calls['_compact']}x {100*spent['_compact']/total:.1f}%, "
          f"realloc {calls['_reallocate']}x {100*spent['_reallocate']/total:.1f}%; width over longest row: mean waste {100*np.mean(waste):.1f}%, max {100*np.max(waste):.1f}%", dict(reasons), flush=True)
