"""Bench-like static runs (B requests of random prompts of 16-256 tokens, 32 new tokens, fixed k), one engine per
KV policy, interleaved step by step, two rounds: tokens/s after the prefill step, reallocations in the decode steps,
peak KV bytes. Policies: "grow" (no reservation) and "reserveC" (`Engine.reserve(B, C)`) for each C given.

    python docs/issue30/kv_growth/growth.py 64x1,64x4,64x0,8x2 416     # cells BxK, reservation columns
"""
import random, sys, time, collections, numpy as np, torch
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.kv import KVConfig
from adactl.runtime import kv as kvmod
from adactl.runtime.models import load_pair, output_vocab_size
spent = collections.defaultdict(float); count = collections.defaultdict(int)
f = kvmod.BatchKV._reallocate
def g(self, rows, cols):
    t = time.perf_counter(); f(self, rows, cols); spent[getattr(self, "tag", "?")] += time.perf_counter() - t; count[getattr(self, "tag", "?")] += 1
kvmod.BatchKV._reallocate = g
pair = load_pair("smollm2", "draft", "none", torch.device("cpu"), torch.float32)
vocab = output_vocab_size(pair.target.model)
configs = {"grow": (KVConfig(), 0), **{f"reserve{c}": (KVConfig(), c) for c in map(int, sys.argv[2].split(","))}}
cells = [tuple(map(int, c.split("x"))) for c in sys.argv[1].split(",")]  # BxK
freeze_heap()
for B, k in cells:
    for rnd in range(2):
        rng = random.Random(rnd)
        prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(16, 256))] for _ in range(B)]
        rss0 = int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**30
        engines = {}
        for name, cfg in configs.items():
            e = Engine(pair.target.model, pair.speculator(with_companion=False), config=EngineConfig(max_batch_size=B, seed=0, kv=cfg[0]))
            if cfg[1]: e.reserve(B, cfg[1])
            for p in prompts: e.add_request(p, SamplingParams(max_new_tokens=32, stop_on_eos=False))
            engines[name] = e
        for name, e in engines.items():
            for kv in e.rows.caches() if hasattr(e, "rows") and hasattr(e.rows, "caches") else []: kv.tag = name
        t = {n: 0.0 for n in engines}; steps = {n: 0 for n in engines}; toks = {n: 0 for n in engines}
        order = list(engines); phase = {}; peak = {}
        live = set(order)
        while live:
            rng.shuffle(order)
            for n in order:
                if n not in live: continue
                e = engines[n]
                spent_before = dict(spent)
                t0 = time.perf_counter(); o = e.step(StepPlan(draft_len=k, prefill_budget=100000)); dt = time.perf_counter() - t0
                steps[n] += 1
                if steps[n] > 1: t[n] += dt; toks[n] += o.tokens_emitted
                if steps[n] == 1: phase[n] = dict(count), dict(spent)
                peak[n] = max(peak.get(n, 0), sum(kv.nbytes() for kv in e.rows.caches()))
                if not e.has_unfinished(): live.discard(n)
        print(f"B{B} k{k} round {rnd}: rss {rss0:.1f} -> {int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**30:.1f} GiB, kv " + " ".join(f"{n}:{peak[n]/2**30:.2f}" for n in engines))
        print(f"B{B} k{k} round {rnd}: " + "  ".join(f"{n} {toks[n]/t[n]:.1f} tok/s ({steps[n]} steps)" for n in engines), flush=True)
        print('   decode reallocs', {n: (count[n] - phase[n][0].get(n, 0), round(spent[n] - phase[n][1].get(n, 0.0), 2)) for n in engines})
        del engines
print("reallocs:", dict(count), {k: round(v, 2) for k, v in spent.items()})
