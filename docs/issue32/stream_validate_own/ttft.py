"""Issue 32: the engine against the replay with its own step costs, prefill steps compared (FCFS, loads 3 and 2).

    PYTHONPATH=. python docs/issue32/stream_validate_own/ttft.py
"""
import json, gzip, numpy as np
from dataclasses import replace
from tqdm import tqdm
from adactl.bench import stream as S
from adactl.bench.common import fitted_cost, StepLog
from adactl.profiler import fingerprint, step_cost_for
from adactl.runtime.replay import ReplayEngine
from adactl.runtime.shapes import StepShape
from adactl.stacks import StackContext, build_stack
from adactl.workloads import arrival_times, OpenLoop, Arrival
from adactl.loop import ControlLoop
from adactl.runtime import SamplingParams
src = "docs/issue32/stream_validate_own"
data = json.load(open(f"{src}/stream.json"))
L = json.load(gzip.open(f"{src}/stream_validate_steps.json.gz", "rt"))["records"]
names = StepShape.names()
args = S.StreamSettings(**{k: v for k, v in data["meta"]["args"].items() if k in S.StreamSettings.__dataclass_fields__})
args = replace(args, validate=False).resolved()
pair, requests, streams = S._workload(args)
step_time = step_cost_for(pair, None, args.refine, max_batch=args.max_batch)
ctx = StackContext(step_time, prefill_budget=args.prefill_budget, max_running=args.max_running)
for load, name in [(3.0, "fcfs"), (2.0, "fcfs")]:
    run = next(r for r in L if r["load"] == load and r["controller"] == name)
    log = [(StepShape(**{n: int(s[n]) for n in names if n in s}), (s["prefill_s"], s["draft_s"], s["verify_s"])) for s in run["steps"]]
    eng = ReplayEngine(fitted_cost(fingerprint(pair.model_ids, pair.device, pair.dtype), log, "own"), max_batch_size=args.max_batch, noise=args.replay_noise, seed=args.seed)
    times = arrival_times(len(requests), load, args.seed, args.burstiness)
    loop = ControlLoop(eng, schedule=build_stack(name, ctx).schedule, max_draft_len=0, prefill_budget=args.prefill_budget, clock=eng.clock)
    arr = [Arrival(times[i], len(p), SamplingParams(n, stop_on_eos=False, seed=args.seed + i), streams[i]) for i, (p, n) in enumerate(requests)]
    rl = StepLog(); drv = OpenLoop(loop, arr, loop.clock, eng.sleep); drv.run(rl.update)
    for tag, lg in (("engine", log), ("replay", rl.steps)):
        pre = [s for s, _ in lg if s.prefill_tokens > 0]
        sec = np.array([x for _, x in lg])
        print(load, name, tag, "steps", len(lg), "prefill steps", len(pre), "prefill tokens", sum(s.prefill_tokens for s in pre),
              "mean rows %.1f" % np.mean([s.rows for s, _ in lg]), "total s %.1f" % sec.sum(), "prefill s %.1f verify s %.1f" % (sec[:, 0].sum(), sec[:, 2].sum()))
    res = loop.results
    tt = sorted(r.first_token_time - r.arrival_time for r in res.values())
    print("replay ttft p50 %.2f" % tt[len(tt)//2])
