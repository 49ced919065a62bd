"""Each streaming run's steps priced by a profile: predicted / measured, decode and prefill steps apart.

    PYTHONPATH=. python docs/issue32/stream_validate_renew/price_steps.py PROFILE STEPS.json[.gz] ...
"""
import gzip
import json
import sys

import numpy as np

from adactl.estimators.step_cost import StepCostProfile
from adactl.runtime.shapes import StepShape
prof = StepCostProfile.load(sys.argv[1]).model(refine=False)
names = StepShape.names()
for path in sys.argv[2:]:
    d = json.load(gzip.open(path) if path.endswith('gz') else open(path))
    for run in d['records']:
        rows=[]
        for s in run['steps']:
            shape = StepShape(**{n: int(s[n]) for n in names if n in s})
            t = s['prefill_s'] + s['draft_s'] + s['verify_s']
            if t <= 0 or shape.rows == 0: continue
            p = float(prof.predict([shape])[0])
            rows.append((shape.rows, shape.prefill_tokens>0, shape.span_tokens/shape.rows, shape.moved_tokens, p, t))
        a=np.array(rows, dtype=float)
        dec=a[a[:,1]==0]; pre=a[a[:,1]==1]
        print(f"{run['load']:>4} {run['controller']:26s} dec n={len(dec)} rows {dec[:,0].mean():.1f} span/row {dec[:,2].mean():.0f} moved/step {dec[:,3].mean():.0f} pred/meas {dec[:,4].sum()/dec[:,5].sum():.3f} | pre n={len(pre)} {pre[:,4].sum()/pre[:,5].sum() if len(pre) else 0:.3f}")
