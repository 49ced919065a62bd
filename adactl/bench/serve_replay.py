"""`adactl bench serve --replay --profile NAME|FILE`: the serve bench in simulated time.

The requests of `adactl bench serve`, drawn from every ShareGPT record rather than the held-out
ones only (the replay learns nothing from them; sweeps of 1,000 requests and more): first
turns, their prompts' tokens by the target's chat template, `max_tokens` = the recorded reply length clipped to
`--max-output-tokens`, greedy, each read by a consumer of `workloads.consumer_mix`) arrive
at the same simulated times at each `--rates` rate, and each `--stacks` entry is served by
`adactl serve`'s own engine loop: its `EngineService` (admission: a 429 when `--max-queue`
requests wait for their first token, a request still waiting after `--max-queue-wait` s
dropped and told to retry) and `ControlLoop`, on a `ReplayEngine` whose steps cost what the
profile says (a computed GPU profile's physics, or a measured profile's fitted model) and
whose drafts follow the shipped ShareGPT acceptance traces. This module turns the service
(`EngineService.tick`) in simulated time instead of on its thread, so a sweep that a GPU
would serve in minutes runs in seconds on any machine.

Measured as the HTTP bench measures at its client (`serve.account`): TTFT from arrival to
the first token, TPOT, output tokens/s, unit-deadline misses, rejections, and per stack the
capacities at `--ttft-target`. What differs, and why:
- no HTTP and no text: a token reaches its reader when its step ends, and words and
  sentences are counted at the replay's fixed tokens per unit (`runtime.replay.TOKENS_PER_UNIT`);
- replies run to their length (the replay has no EOS; the HTTP bench's greedy replies may
  stop earlier);
- no peer: `transformers serve` runs a model, so the reference of the capacity ratios is
  `adactl[fcfs]` (vLLM's policy) when it is among the stacks.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from adactl.bench.common import format_table, write_json
from adactl.bench.serve import COLUMNS, Job, Received, ServeBenchSettings, account, add_capacity, plot, ratios, workload
from adactl.runtime import SamplingParams
from adactl.runtime.replay import ReplayEngine, replayed_units
from adactl.workloads import arrival_times

TITLE = "adactl serve's engine loop on the replay (simulated time, no HTTP)"


class Reader:
    """One request's client: the service's events, stamped with the simulated time they came."""

    def __init__(self, clock: Any, arrival: float, unit: str) -> None:
        self.clock, self.arrival, self.unit = clock, arrival, unit
        self.status = 0  # 200 once the engine accepted it; 429 rejected; 500 an error
        self.tokens = 0
        self.chunks: list[tuple[float, int, int]] = []
        self.done = False

    def push(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "added":
            self.status = 200
        elif kind == "tokens":
            self.tokens += len(event[1])
            self.chunks.append((self.clock(), self.tokens, replayed_units(self.unit, self.tokens, False)))
        elif kind == "done":
            self.done = True
            if self.chunks:  # whatever is left of the last unit counts at the end, as the replay's own account
                t, k, _ = self.chunks[-1]
                self.chunks[-1] = (t, k, replayed_units(self.unit, k, True))
        else:  # "rejected" before any token (the HTTP server answers 429), or an error (mid-stream: one too)
            self.status = 429 if kind == "rejected" and not self.chunks else 500
            self.done = True

    def received(self) -> Received:
        return Received(self.arrival, self.status if self.done else -2, self.chunks if self.status == 200 else [])


def serve_one(stack_name: str, ctx: Any, engine: ReplayEngine, jobs: list[Job], times: list[float],
              args: ServeBenchSettings, max_draft_len: int) -> list[Received]:  # fmt: skip
    """Serve `jobs` arriving at `times` with `adactl serve`'s service and loop on `engine`."""
    from adactl.loop import ControlLoop
    from adactl.server.service import EngineService, ServiceConfig
    from adactl.stacks import build_stack

    stack = build_stack(stack_name, ctx)
    loop = ControlLoop(engine, stack.schedule, stack.verify, max_draft_len=max_draft_len,
                       prefill_budget=ctx.prefill_budget, clock=engine.clock)  # fmt: skip
    service = EngineService(loop, config=ServiceConfig(args.max_queue, args.max_queue_wait), clock=engine.clock)
    readers: list[Reader] = []

    def turn() -> None:
        """One turn of the service; a turn that costs no simulated time (nothing ran: every
        request held back) waits as the idle server would, so the clock always moves."""
        before = engine.clock()
        service.tick()
        if engine.clock() == before:
            engine.sleep(service.config.idle_wait_s)

    for job, at in zip(jobs, times):
        while service.open_requests() and engine.clock() < at:  # serve until the next arrival
            turn()
        engine.sleep(at - engine.clock())  # idle until it (nothing if a step ran past it)
        reader = Reader(engine.clock, at, job.stream.unit)
        readers.append(reader)
        if service.overloaded():
            reader.push(("rejected", service.retry_after()))
            continue
        service.submit(reader, job.prompt, SamplingParams(job.max_tokens, stop_on_eos=False), None, job.stream, at)
    limit = times[-1] + args.time_limit if times else 0.0
    while service.open_requests() and engine.clock() < limit:
        turn()
    return [r.received() for r in readers]


def run(args: ServeBenchSettings) -> list[dict[str, Any]]:
    from adactl.bench.spec_replay import truth
    from adactl.estimators import load_acceptance
    from adactl.estimators.step_cost import StepCostProfile
    from adactl.profiler import named_profile
    from adactl.runtime.traces import shipped_traces
    from adactl.stacks import StackContext, costs_steps, drafts, needs_companion

    if args.profile is None:
        raise SystemExit("adactl bench serve --replay needs --profile: a computed GPU profile by name "
                         "(h100-llama-3.1-8b, a100-llama-3.1-8b, h200-llama-3.1-8b, h100x4-llama-3.1-70b) or a file "
                         "from adactl profile --out")  # fmt: skip
    refused = [s for s in args.stacks if needs_companion(s)]
    if refused:
        raise SystemExit(f"adactl bench serve --replay cannot run {', '.join(refused)}: the shipped ShareGPT traces "
                         "carry no companion")  # fmt: skip
    profile = StepCostProfile.load(named_profile(args.profile))
    _, jobs = workload(args)
    traces = shipped_traces("sharegpt", trees=False) if any(drafts(s) for s in args.stacks) else None
    cost = truth(profile)
    out = Path(args.out)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(args.stacks) * len(args.rates) * len(jobs), desc="bench serve (replay)", unit="req")
    for stack in args.stacks:
        step_time = profile.model(refine=args.refine) if costs_steps(stack) else None  # one server's, over its rates
        ctx = StackContext(step_time, load_acceptance, args.prefill_budget)
        for rate in args.rates:
            times = arrival_times(len(jobs), rate, args.seed, args.burstiness)
            engine = ReplayEngine(cost, traces.mean_acceptance() if traces is not None else (),
                                  max_batch_size=args.max_batch, noise=args.replay_noise, seed=args.seed,
                                  traces=traces)  # fmt: skip
            got = serve_one(stack, ctx, engine, jobs, times, args, args.max_draft_len if drafts(stack) else 0)
            record = {"server": f"adactl[{stack}]", "rate": rate, **account(got, jobs)}
            records.append(record)
            bar.update(len(jobs))
    bar.close()
    add_capacity(records, args.ttft_target)
    summary = ratios(records, reference="adactl[fcfs]")
    print(format_table(records, COLUMNS))
    print(json.dumps(summary, indent=2))
    where = profile.fingerprint.machine_label
    meta = {"summary": summary, "machine": {"label": f"replay of {where}", "replayed": where},
            "profile": str(args.profile), "target": profile.fingerprint.target,
            "replay": {"truth": type(cost).__name__, "noise": args.replay_noise,
                       "acceptance": f"traces: sharegpt ({len(traces)} requests)" if traces is not None else "none"},
            "args": asdict(args)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "serve.json", records, meta)
    plot(records, out / "serve.png", args.ttft_target, f"replay of {where}", TITLE)
    return records
