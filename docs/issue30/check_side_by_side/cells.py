"""Per (rows, k) whole-batch cells of a profile: per-step seconds and context per row, ratio to plain."""
import json, sys, numpy as np
d = json.load(open(sys.argv[1]))
cells = {}
for s in d["steps"]:
    if s["rows"] == 0 or s["prefill_tokens"]: continue
    r = s["rows"]; k = s["max_draft"]
    whole = s["draft_tokens"] == r * k and s["verify_tokens"] == r * (k + 1)
    if not whole: continue
    t = s["prefill_s"] + s["draft_s"] + s["verify_s"]
    cells.setdefault((r, k), []).append((t, s["context_tokens"] / r))
for r in sorted({r for r, _ in cells}):
    p = cells.get((r, 0), [])
    pm = np.median([t for t, _ in p]) if p else float("nan")
    line = f"b={r:3d} plain {1000*pm:6.0f}ms n={len(p)} ctx={np.mean([c for _, c in p]) if p else 0:5.0f} |"
    for k in (1, 2, 4):
        c = cells.get((r, k), [])
        if c: line += f" k{k}: {np.median([t for t,_ in c])/pm:.2f} (n={len(c)}, spread {np.ptp([t for t,_ in c])/np.median([t for t,_ in c]):.2f})"
    print(line)
