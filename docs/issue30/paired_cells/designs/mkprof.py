"""Make a profile with one profiler design: A (rows of 16-256 tokens, uniform, renewed past 384: as shipped),
B (rows as long as the bench's, renewed 64 tokens past their prompt), C (the bench's lengths, renewed past 384),
D (A with up to 10 rounds a size, at least 6). Needs bench_rows.patch applied (it adds `row_prompt_length` and
`measure(max_growth=)`; A and D undo it here):

    git apply docs/issue30/paired_cells/designs/bench_rows.patch
    PYTHONPATH=. python docs/issue30/paired_cells/designs/mkprof.py A 0 A_0.json
"""
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
