"""Scratch: make a profile with a profiler design. design: A (uniform rows 16-256, renew past 384: as shipped before),
B (bench rows, renew at prompt + 64), C (bench rows, renew past 384), D (A with reps 10, min_rounds 6)."""
import sys, functools, random
import torch
import adactl.profiler as prof
from adactl.runtime.models import load_pair
design, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
orig = prof.measure
kw = {}
if design in ('A', 'D'):
    prof.row_prompt_length = lambda rng, longest=256: rng.randint(16, longest)
    kw['max_growth'] = 10**6
if design == 'C':
    kw['max_growth'] = 10**6
if design == 'D':
    kw['min_rounds'] = 6
def measure(*a, **k):
    k.update(kw)
    if design == 'D':
        a = list(a); a[5] = 10  # reps
    return orig(*a, **k)
prof.measure = measure
pair = load_pair('smollm2', 'draft', 'none', 'cpu', torch.float32)
made = prof.make_profile(pair, 64, 300.0, 6, seed, progress=False)
made.save(out)
print(design, seed, made.meta['steps'], made.meta['profile_s'])
