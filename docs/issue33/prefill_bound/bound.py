"""First-token lateness on `--workload long` that a scheduler cannot beat, or only by sacrifice.

Every stack in `adactl bench stream --replay --capacity --workload long` at the 100k-token pool
fails its SLO the same way: first tokens in prefill bursts (docs/memory.md). This prices what a
server could do with that arrival trace on the computed GPU profile if it did nothing but
prefill: no decode row ever costs a step, memory never binds, each step is priced at what its
prefill alone costs and its first tokens come at the earliest the replay would give them, in
chunks of `--budget` tokens (the bench's --prefill-budget), in arrival order.

Every `long` reader reads tokens, so every first token is due 1 s after its arrival, and arrival
order is earliest-deadline-first, which minimises the largest lateness (preemptive EDF is
optimal for it with release times; here a prompt can be set aside at a chunk's end). Over 100
requests the SLO's p99 is within a hundredth of the second-largest lateness, so `--drop` (the
smallest largest lateness left after removing any one request, its work gone) bounds what any
order can reach. Over 1,000 requests x 3 seeds the p99 is the 30th-largest of 3,000 and a
scheduler could in principle give up 30: there the arrival-order figures are what arrival order
reaches, not a bound (a stack that let some requests wait for memory while later ones went
ahead measured up to 0.02 s below them); the two reorderings tried (`srpt`, shortest prompt
first; `triage`, Moore-Hodgson's rule for the fewest late jobs, applied online) were worse.

    PYTHONPATH=. python docs/issue33/prefill_bound/bound.py --seeds 0 --drop       # 100 requests
    PYTHONPATH=. python docs/issue33/prefill_bound/bound.py --seeds 0,1,2 --requests 1000
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np

from adactl.estimators.gpu_cost import shipped_gpu_profile
from adactl.runtime.shapes import StepShape, prefill_pairs
from adactl.workloads import duty_cycle_arrivals, long_requests


def triage(q, done, prompts, arrivals, now, per_token, ttft):
    """Moore-Hodgson on the queue (the fewest late first tokens): in deadline order, whenever the
    work ahead makes a request late, the largest prompt not yet started among those so far goes
    to the back. Prompts part-way through keep their place (their chunks are computed)."""
    started = [i for i in q if done[i]]
    fresh = sorted((i for i in q if not done[i]), key=lambda i: arrivals[i])
    t = now + per_token * sum(prompts[i] - done[i] for i in started)
    kept, back = [], []
    for i in fresh:
        kept.append(i)
        t += per_token * prompts[i]
        if t > arrivals[i] + ttft:
            big = max(kept, key=lambda j: prompts[j])
            kept.remove(big)
            back.append(big)
            t -= per_token * prompts[big]
    return started + kept + sorted(back, key=lambda i: arrivals[i])


def first_tokens(cost, arrivals, prompts, budget, policy="fcfs", ttft=1.0):
    """First-token times of a prefill-only server with a `budget`-token chunk a step, in
    arrival order (`fcfs`) or with `triage`."""
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i])
    done = [0] * len(prompts)
    out = [0.0] * len(prompts)
    now, q, nxt = 0.0, [], 0
    while nxt < len(order) or q:
        while nxt < len(order) and arrivals[order[nxt]] <= now:
            q.append(order[nxt])
            nxt += 1
        if not q:
            now = arrivals[order[nxt]]
            continue
        if policy == "triage":
            per_token = chunk_s(cost, budget, prefill_pairs([(0, budget)]))[0] / budget
            q = triage(q, done, prompts, arrivals, now, per_token, ttft)
        elif policy == "srpt":  # shortest remaining prompt first
            q = sorted(q, key=lambda i: prompts[i] - done[i])
        room, chunks, ended = budget, [], []
        for i in q:
            if room == 0:
                break
            size = min(room, prompts[i] - done[i])
            chunks.append((done[i], size))
            done[i] += size
            room -= size
            if done[i] == prompts[i]:
                ended.append(i)
        step, early = chunk_s(cost, budget - room, prefill_pairs(chunks))
        now += step
        for i in ended:
            out[i] = now - early
            q.remove(i)
    return out


def chunk_s(cost, tokens, pairs):
    """(the least a step with this prefill takes, how much sooner than its end its prompts' first
    tokens can come) in the replay's prices (`GpuStepCost.parts`). A step costs at least its
    prefill alone: the launch, the linear layers over its tokens, their attention. With decode
    rows beside it, the replay charges the launch and one read of the weights to their verify
    part, which comes after the prefill part and so after the first tokens: those come up to
    that much before the step ends."""
    shape = StepShape(
        rows=0,
        verify_tokens=0,
        max_verify=0,
        draft_tokens=0,
        max_draft=0,
        prefill_tokens=tokens,
        context_tokens=0,
        prefill_attention=pairs,
    )
    return float(cost.parts(shape)[0]), cost.engine.launch_s + cost.weight_s


def lateness(cost, arrivals, prompts, budget, ttft, policy, keep):
    t = first_tokens(cost, [arrivals[i] for i in keep], [prompts[i] for i in keep], budget, policy, ttft)
    return [max(0.0, t[j] - arrivals[keep[j]] - ttft) for j in range(len(keep))]


def drop_one(cost, arrivals, prompts, budget, ttft, policy):
    """The smallest largest lateness left after removing one request (its work vanishes): a
    lower bound on the second largest lateness of any schedule in `policy`'s order family,
    and with `fcfs` (EDF: equal relative deadlines) of any schedule at all."""
    every = list(range(len(arrivals)))
    values = lateness(cost, arrivals, prompts, budget, ttft, policy, every)
    late = [j for j in every if values[j] > 0] or every[:1]
    return min(max(lateness(cost, arrivals, prompts, budget, ttft, policy, [i for i in every if i != j])) for j in late)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="h100-llama-3.1-8b")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--ttft", type=float, default=1.0)
    ap.add_argument("--drop", action="store_true", help="also the drop-one bound, seed by seed")
    ap.add_argument("--policy", default="fcfs", choices=("fcfs", "triage", "srpt"))
    ap.add_argument("--rates", default="0.01,0.025,0.05,0.1,0.131,0.15,0.2,0.262,0.3,0.4")
    ap.add_argument("--plot", help="a PNG: p99 against rate, the bound's and --measured runs' points")
    ap.add_argument("--measured", nargs="*", default=[], help="stream.json files of the same workload")
    ap.add_argument("--out", help="the rows as JSON")
    args = ap.parse_args()
    cost = shipped_gpu_profile(args.profile)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        pooled, row = [], {"rate": rate, "policy": args.policy, "requests": args.requests}
        first = [p for p, _ in long_requests(args.requests, seeds[0])]
        for k, seed in enumerate(seeds):  # as `adactl bench stream --seeds`: seed 0's requests, reordered
            prompts = first if k == 0 else random.Random(seed).sample(first, len(first))
            at = duty_cycle_arrivals(args.requests, rate, seed)
            values = lateness(cost, at, prompts, args.budget, args.ttft, args.policy, list(range(len(at))))
            pooled += values
            row[f"p99_seed{seed}"] = float(np.percentile(values, 99))
            if args.drop:
                row[f"drop_one_seed{seed}"] = drop_one(cost, at, prompts, args.budget, args.ttft, args.policy)
        row["p99_pooled"] = float(np.percentile(pooled, 99))
        rows.append(row)
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, seeds, args)


def plot(rows, seeds, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rates = [r["rate"] for r in rows]
    key = "p99_pooled" if len(seeds) > 1 else f"p99_seed{seeds[0]}"
    order = {"fcfs": "arrival order", "srpt": "shortest prompt first", "triage": "Moore-Hodgson"}[args.policy]
    what = f"prefill only, {order}" + (f", {len(seeds)} seeds pooled" if len(seeds) > 1 else "")
    ax.plot(rates, [r[key] for r in rows], "k-o", label=what)
    if args.drop and len(seeds) == 1:
        ax.plot(
            rates, [r[f"drop_one_seed{seeds[0]}"] for r in rows], "k:^", label="... any order, one request given up"
        )
    if len(seeds) > 1:
        for seed in seeds:
            ax.plot(
                rates, [r[f"p99_seed{seed}"] for r in rows], ":", alpha=0.6, label=f"prefill only, seed {seed} alone"
            )
    for path in args.measured:
        with open(path) as f:
            records = json.load(f)["records"]
        for name in sorted({r["controller"] for r in records}):
            pts = sorted((r["load"], r["late_p99_s"]) for r in records if r["controller"] == name)
            ax.plot(*zip(*pts), "x--", label=f"{name} (replay, {records[0].get('seeds', 1)} seeds)")
    ax.axhline(1.0, color="r", lw=0.8)
    ax.set(
        xlabel="mean arrival rate (requests/s)",
        ylabel="first token p99 late (s)",
        title=f"--workload long, {args.profile}, {args.requests} requests: a prefill-only server's first tokens",
    )
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
