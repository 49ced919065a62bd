"""What `goodput`'s probes cost where plain decoding is served: batch 32, greedy, `no-spec`,
`goodput` and `goodput,sv` interleaved step by step as `bench spec` runs them (2 rounds), and
per step (the prefill step included) the loop's wall seconds, the engine's draft / verify /
prefill seconds, the controllers' seconds and the tokens drafted.

    ADACTL_CACHE=... PYTHONPATH=. python docs/issue30/probe_cost_b32/probe_cost.py
"""

from collections import defaultdict
from functools import partial

from tqdm import tqdm

from adactl.bench import spec
from adactl.runtime import freeze_heap

args = spec.SpecSettings(batches=[32], temperatures=[0.0], max_new_tokens=32).resolved()
target, draft, pair, prompts, ctx, _ = spec._load(args)
engines = spec.Engines(target, draft, pair)
freeze_heap()
names = ["no-spec", "goodput", "goodput,sv"]
acc = defaultdict(lambda: defaultdict(float))
for r in range(2):
    runs = [partial(spec.start_one, n, engines, prompts[:32], 0.0, ctx, args, tqdm(disable=True)) for n in names]
    started = [s() for s in runs]
    for s in started:
        loop_step = s.loop.step

        def wrapped(loop_step=loop_step, name=s.label["controller"]):
            import time as _t

            t0 = _t.perf_counter()
            record = loop_step()
            acc[name]["wall_s"] += _t.perf_counter() - t0
            o = record.outcome
            a = acc[name]
            a["steps"] += 1
            a["draft_s"] += float(o.draft_s)
            a["verify_s"] += float(o.verify_s)
            a["prefill_s"] += float(o.prefill_s)
            a["total_s"] += float(o.total_s)
            a["drafted"] += int(o.drafted.sum())
            a["control_s"] += record.control_s
            return record

        s.loop.step = wrapped
    live = [s for s in started if not s.done]
    import random

    rng = random.Random(r)
    while live:
        rng.shuffle(live)
        for s in live:
            s.step()
        live = [s for s in live if not s.done]
    print(
        r,
        [
            (s.label["controller"], round(s.result()["tokens_per_s"], 1), round(s.result()["step_ms"], 1))
            for s in started
        ],
    )
for n, a in acc.items():
    print(n, {k: round(v / a["steps"] * 1000, 2) if k.endswith("_s") else v for k, v in a.items()})
