"""Check several profiles on the same held-out steps (`adactl.profiler.check_ratios`, 12 rounds), the check's
rows as long as the bench's (`bench`: needs bench_rows.patch applied) or 16-256 tokens, uniform (`uniform`: as
`adactl profile --check` draws them):

    PYTHONPATH=. python docs/issue30/paired_cells/designs/checkexp.py bench 0 x_bench_s0.json A_0.json B_0.json ...
"""
import json, math, sys, random
import numpy as np, torch
import adactl.profiler as prof
from adactl.estimators.step_cost import StepCostProfile
from adactl.runtime.models import load_pair
rows, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
files = sys.argv[4:]
if rows == 'uniform':
    prof.row_prompt_length = lambda rng, longest=256: rng.randint(16, longest)
pair = load_pair('smollm2', 'draft', 'none', 'cpu', torch.float32)
models = {f: StepCostProfile.load(f).model(refine=False) for f in files}
recs = prof.check_ratios(pair, models, [1, 2, 4, 8, 16, 32, 64], [1, 2, 4], 12, seed + 1, progress=False)
json.dump(recs, open(out, 'w'), indent=0)
for f in files:
    mine = [r for r in recs if r['profile'] == f]
    bad = [(r['batch_size'], r['k'], round(100 * r['error'], 1)) for r in mine if abs(r['error']) > 0.05]
    print(rows, seed, f.split('/')[-1], 'mae %.1f' % (100 * np.mean([abs(r['error']) for r in mine])), 'within', len(mine) - len(bad), bad)
