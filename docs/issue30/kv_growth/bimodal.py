"""Plain, k = 1 and k = 4 step times at batch B (4 fresh engines of B rows, prompts of 16-256 random tokens, 6
shuffled rounds each), with each step's draft / verify split and its seconds in reallocation and compaction.
MODE: none; mallopt (glibc's mmap and trim thresholds raised); reserve (`Engine.reserve(B, 512)`).

    python docs/issue30/kv_growth/bimodal.py none|mallopt|reserve 64 [COL_HEADROOM MIN_COL_GROWTH]
"""
import random, sys, time, ctypes, numpy as np, torch
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.models import load_pair, output_vocab_size
mode = sys.argv[1] if len(sys.argv) > 1 else "none"
if mode == "mallopt":
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    print("mallopt", libc.mallopt(M_MMAP_THRESHOLD, 1 << 30), libc.mallopt(M_TRIM_THRESHOLD, 1 << 31 - 1))
from adactl.runtime.kv import KVConfig
KV = KVConfig(col_headroom=float(sys.argv[3]), min_col_growth=int(sys.argv[4])) if len(sys.argv) > 4 else KVConfig()
print(KV)
B = int(sys.argv[2]) if len(sys.argv) > 2 else 64
pair = load_pair("smollm2", "draft", "none", torch.device("cpu"), torch.float32)
vocab = output_vocab_size(pair.target.model); rng = random.Random(0)
sampling = SamplingParams(max_new_tokens=4096, stop_on_eos=False)
def make():
    e = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=B, seed=0, kv=KV))
    if mode == "reserve": e.reserve(B, 512)
    for i in range(B):
        e.add_request([rng.randrange(1, vocab) for _ in range(rng.randint(16, 256))], sampling)
    while any(v.status != "running" for v in e.requests()):
        e.step(StepPlan(draft_len=0, prefill_budget=2048))
    return e
from adactl.runtime import kv as kvmod
spent = {"realloc": 0.0, "compact": 0.0, "forward": 0.0}
def wrap(name, key):
    f = getattr(kvmod.BatchKV, name)
    def g(self, *a, **kw):
        t = time.perf_counter(); r = f(self, *a, **kw); spent[key] += time.perf_counter() - t; return r
    setattr(kvmod.BatchKV, name, g)
wrap("_reallocate", "realloc"); wrap("_compact", "compact")
freeze_heap()
res = {0: [], 1: [], 4: []}; extra = {0: [], 1: [], 4: []}; parts = {0: [], 1: [], 4: []}
for r in range(4):
    e = make()
    for k in (1, 0, 4): e.step(StepPlan(draft_len=k, prefill_budget=0))
    for i in range(6):
        for k in rng.sample([0, 1, 4], 3):
            spent.update(realloc=0.0, compact=0.0); t = time.perf_counter(); o = e.step(StepPlan(draft_len=k, prefill_budget=0)); res[k].append(time.perf_counter() - t); parts[k].append((o.draft_s, o.verify_s)); extra[k].append((spent['realloc'], spent['compact']))
    del e
for k, v in res.items():
    v = np.array(v) * 1000
    print(mode, B, f"k{k}", f"median {np.median(v):.0f} ms", "sorted", " ".join(f"{x:.0f}" for x in sorted(v)))

for k in (1, 4):
    p = np.array(parts[k]) * 1000; order = np.argsort(res[k])
    print(f"k{k} draft/verify by total:", " ".join(f"{p[i,0]:.0f}/{p[i,1]:.0f}" for i in order))

for k in (1, 4):
    p = np.array(extra[k]) * 1000; order = np.argsort(res[k])
    print(f"k{k} realloc/compact by total:", " ".join(f"{p[i,0]:.0f}/{p[i,1]:.0f}" for i in order))
