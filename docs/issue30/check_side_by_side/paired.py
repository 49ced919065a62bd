import json, sys, numpy as np
d = json.load(open(sys.argv[1])); chk = json.load(open(sys.argv[2]))["records"]
meas = {(r["batch_size"], r["k"]): r["measured_ratio"] for r in chk if r["profile"] == "this"}
pred = {(r["batch_size"], r["k"]): r["predicted_ratio"] for r in chk if r["profile"] == "this"}
rounds, cur = [], None
for s in d["steps"]:
    r, k = s["rows"], s["max_draft"]
    whole = r > 0 and not s["prefill_tokens"] and s["draft_tokens"] == r * k and s["verify_tokens"] == r * (k + 1)
    t = s["prefill_s"] + s["draft_s"] + s["verify_s"]
    if whole and cur is not None and cur["b"] == r and k not in cur["t"]:
        cur["t"][k] = t
    elif whole:
        cur = {"b": r, "t": {k: t}}; rounds.append(cur)
    else:
        cur = None
err_c, err_p = [], []
for b in sorted({x["b"] for x in rounds}):
    rs = [x["t"] for x in rounds if x["b"] == b and 0 in x["t"]]
    line = f"b={b:3d} rounds={len(rs)}"
    for k in (1, 2, 4):
        lr = [np.log(t[k] / t[0]) for t in rs if k in t]
        paired = float(np.exp(np.median(lr)))
        m = meas.get((b, k))
        line += f" | k{k} paired {paired:.2f} model {pred[(b,k)]:.2f} check {m:.2f}"
        err_p.append(abs(paired / m - 1)); err_c.append(abs(pred[(b, k)] / m - 1))
    print(line)
print(f"mean abs error: model {100*np.mean(err_c):.1f}% max {100*max(err_c):.1f}; paired medians {100*np.mean(err_p):.1f}% max {100*max(err_p):.1f}")
