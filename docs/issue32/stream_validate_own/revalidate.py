"""The replay half of `adactl bench stream --validate` again, against the engine runs recorded
in DIR (stream.json, stream_validate_steps.json[.gz]), priced by PROFILE; writes OUT.

    PYTHONPATH=. python docs/issue32/stream_validate_own/revalidate.py \
        docs/issue32/stream_validate_own docs/issue32/stream_validate_own/profile_nonnegative.json /tmp/out.json

PROFILE "own": each run priced by a model fitted on that engine run's own steps (the backend
`replay-own` of `bench stream --validate`), with the controllers on the machine's profile.
(issue 32: the same engine runs, replayed with the profile refitted by non-negative least
squares, and with the replay's first-token time fixed.)
"""
import gzip
import json
import sys
from pathlib import Path
from dataclasses import replace
from tqdm import tqdm
from adactl.bench import stream as S
from adactl.estimators.step_cost import StepCostProfile
from adactl.runtime.replay import ReplayEngine
from adactl.stacks import StackContext, build_stack
from adactl.workloads import arrival_times
from adactl.bench.common import fitted_cost, step_error
from adactl.profiler import fingerprint, step_cost_for
from adactl.runtime.shapes import StepShape

src, profile_file, out = sys.argv[1], sys.argv[2], sys.argv[3]
own = profile_file == "own"
data = json.load(open(f"{src}/stream.json"))
steps = Path(src, "stream_validate_steps.json")
L = json.load(open(steps) if steps.is_file() else gzip.open(f"{steps}.gz", "rt"))["records"]
names = StepShape.names()
logs = {(run["load"], run["controller"]): [(StepShape(**{n: int(s[n]) for n in names if n in s}),
        (s["prefill_s"], s["draft_s"], s["verify_s"])) for s in run["steps"]] for run in L}
args = S.StreamSettings(**{k: v for k, v in data["meta"]["args"].items() if k in S.StreamSettings.__dataclass_fields__})
args = replace(args, profile=None if own else profile_file, validate=False).resolved()
pair, requests, streams = S._workload(args)
step_time = step_cost_for(pair, args.profile, args.refine, max_batch=args.max_batch)
replay_time = step_time.frozen()
ctx = StackContext(step_time, prefill_budget=args.prefill_budget, max_running=args.max_running)
engine_recs = [r for r in data["records"] if r["backend"] == "engine"]
records = list(engine_recs)
bar = tqdm(total=sum(n for _, n in requests) * len(engine_recs))
for e in engine_recs:
    times = arrival_times(len(requests), e["load"], args.seed, args.burstiness)
    cost = fitted_cost(fingerprint(pair.model_ids, pair.device, pair.dtype), logs[(e["load"], e["controller"])], "own") if own else replay_time
    eng = ReplayEngine(cost, max_batch_size=args.max_batch, noise=args.replay_noise, seed=args.seed)
    r = S.serve(eng, build_stack(e["controller"], ctx).schedule, [(len(p), n) for p, n in requests], streams, times, args, bar)
    records.append({"backend": "replay", "load": e["load"], "controller": e["controller"], **r})
bar.close()
summary = S.validation(records)
# the profile on the engine's own steps
errs = [step_error(replay_time, log)["total"] for log in logs.values()]
summary["step_time_rel_error"] = sum(abs(x) for x in errs) / len(errs)
summary["step_time_mean_error"] = sum(errs) / len(errs)
print(json.dumps(summary, indent=1))
json.dump({"summary": summary, "records": [{k: v for k, v in r.items() if k not in ("inflight_timeline", "step_log")} for r in records]}, open(out, "w"), indent=1, default=str)
