"""b-row k-step and plain-step times (fresh rows, 8 rounds, medians; ms) in a process set up as `adactl profile`
(cli) or as `adactl bench spec` (bench: its _load), and cli plus one part of the bench's setup:
+comp (the companion loaded), +prompts (spec_prompts in this process), +prompts+child (in a forked child),
+prompts+trim (then malloc_trim), +read (ShareGPT read, dropped), +read+keep, +read+trim, +tok (300 short
chat templates tokenized).

    PYTHONPATH=. python docs/issue30/process_state/proc_ab.py VARIANT 4   # batch size
"""
import random, statistics as st, sys, time
import torch
variant = sys.argv[1]
b = int(sys.argv[2]) if len(sys.argv) > 2 else 4
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.models import load_pair, output_vocab_size
keep = []
if variant.startswith("cli"):
    pair = load_pair("smollm2", "draft", "companion" if variant == "cli+comp" else "none")
    target, draft = pair.target.model, pair.draft
    if variant == "cli+prompts":
        from adactl.workloads import spec_prompts
        keep.append(spec_prompts(pair.tokenizer, "sharegpt", 200, 256))
    if variant == "cli+prompts+trim":
        from adactl.workloads import spec_prompts
        keep.append(spec_prompts(pair.tokenizer, "sharegpt", 200, 256))
        import ctypes, gc; gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    if variant == "cli+prompts+child":
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from adactl.workloads import spec_prompts
        with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as ex:
            keep.append(ex.submit(spec_prompts, pair.tokenizer, "sharegpt", 200, 256).result())
        print("prompts", len(keep[-1]))
    if variant == "cli+read":
        from adactl.workloads import read_sharegpt
        n = len(read_sharegpt().records)
    if variant == "cli+read+keep":
        from adactl.workloads import read_sharegpt
        keep.append(read_sharegpt())
    if variant == "cli+tok":
        from adactl.workloads import chat_ids
        for i in range(300):
            keep.append(chat_ids(pair.tokenizer, [{"role": "user", "content": "hello world " * (i % 50 + 1)}]))
    if variant == "cli+read+trim":
        from adactl.workloads import read_sharegpt
        n = len(read_sharegpt().records)
        import ctypes, gc; gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
else:
    from adactl import settings as S
    from adactl.bench import spec
    args = S.from_args(spec.SpecSettings, spec_ns := __import__("argparse").Namespace()) if False else spec.SpecSettings().resolved()
    target, draft, both, prompts, ctx, meta = spec._load(args)
    keep = [both, prompts, ctx]
    if variant == "bench+engine":
        engines = spec.Engines(target, draft, both, spec.kv_columns(prompts, args))
        keep.append(engines(False, 8))
vocab = output_vocab_size(target)
rng = random.Random(0)
sampling = SamplingParams(max_new_tokens=4096, stop_on_eos=False)
e = Engine(target, draft, config=EngineConfig(max_batch_size=b, seed=0))
e.reserve(b, 512)
for _ in range(b):
    e.add_request([rng.randrange(1, vocab) for _ in range(rng.randint(16, 256))], sampling)
while any(v.status != "running" for v in e.requests()):
    e.step(StepPlan(draft_len=0, prefill_budget=1024))
freeze_heap()
ks = [0, 1, 2, 4]
t = {k: [] for k in ks}
parts = {k: [] for k in ks}
for r in range(9):
    for k in rng.sample(ks, len(ks)):
        t0 = time.perf_counter()
        e.draft_step(StepPlan(draft_len=k, prefill_budget=0)); o = e.verify()
        if r:
            t[k].append(1000 * (time.perf_counter() - t0))
            parts[k].append((1000 * o.draft_s, 1000 * o.verify_s))
import os
tasks = os.listdir("/proc/self/task")
def cpu(t):
    f = open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()
    return (open(f"/proc/self/task/{t}/comm").read().strip(), int(f[11]) + int(f[12]))
print("tasks", len(tasks), sorted((cpu(t) for t in tasks), key=lambda x: -x[1])[:8])
print(variant, " ".join(f"k{k}: d{st.median(a for a, _ in parts[k]):.1f} v{st.median(v for _, v in parts[k]):.1f}" for k in ks))
print(variant, f"b{b}", " ".join(f"k{k}={st.median(t[k]):.1f}" for k in ks), "threads", torch.get_num_threads(), flush=True)
