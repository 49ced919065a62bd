"""`adactl bench stream`: streaming schedulers side by side over a load sweep.

Requests (held-out ShareGPT first turns, each generating the length of the reply it got,
`stop_on_eos=False`) arrive open-loop at each `--loads` rate (requests/s; Poisson, or Gamma
gaps with `--burstiness` < 1), each read by a consumer from `workloads.consumer_mix` (reading
and speech rates, in tokens, words and sentences; first unit due `--ttft` s after arrival).
Every stack (`adactl.stacks`; `adactl stacks` lists them) serves the same requests, arrivals
and consumers at every load:

- `fcfs`: vLLM's scheduler with its defaults here (no in-flight cap, 512-token prefill budget);
  `fcfs-seqs{N}`: the same with `max_num_seqs` = N (`--fcfs-seqs`), the tuned baselines;
- `edf`, `andes`: deadline-first and Andes-style priority, each running at most `--max-running`
  requests per step;
- `fcfs,ttft-budget`: FCFS with the TTFT-bounded prefill budget instead of the static one;
- `progressserve,ttft-budget`: ProgressServe (run at-risk, defer safe, admit only what stays
  safe) with the TTFT-bounded prefill budget.

Workloads (`--workload`): `sharegpt` (the above, replies clipped to `--max-new-tokens`);
`chat` (the same first turns with their whole replies, up to 4,096 tokens); `long` (4-16k-token
prompts, 300-800-token replies, arrivals in duty-cycle bursts of 2.5x the mean with Gamma gaps
of CV 2.5, token and speech readers; on the real engine scaled down by `--long-scale`);
`mixed-consumers` (ShareGPT, token and speech readers and 15% machine consumers at 30-50
tokens/s). `--kv-tokens` bounds KV memory on both backends (`EngineConfig.kv_tokens`: every
stack gets the same pool), `--kv-offload` adds host memory to offload to.

Reported per controller and load: missed units per unit (a stall of d seconds misses
ceil(d * rate) units of the stream, each once: a fraction), p50/p99 TTFT and first-token
lateness (past the `--ttft` target), mean TPOT,
admitted in-flight requests (time-weighted mean over the run, beside lambda * W), effective
throughput (tokens read on time per second), requests refused, and per controller
`capacity_at_slo`: the largest load at SLO (missed units <= 0.5%, first-token lateness p99
<= 1 s, nothing refused), with the in-flight requests at that load. The first `--warmup` of the
requests (by arrival) are served and not measured. `--capacity` (replay) finds each stack's
capacity at SLO by bisection over the arrival rate instead of the `--loads` grid, every point
served with `--seeds` seeds pooled. `--closed-loop` serves sessions instead of open-loop
arrivals (`workloads.ClosedLoop`): each load is a number of users who ask, read the reply,
think `--think` s and ask again, and `--capacity` finds the most sessions at SLO, the honest
meaning of "admitted in-flight" (an open loop's in-flight count is Little's L = lambda * W,
which slowing streams raises). `--replay` runs the sweep on `ReplayEngine` (the
step-time model fitted on the real engine's profile; seconds instead of an hour);
`--validate` runs both on the same loads and reports the replay's error, with the engine's own
steps (their shapes and measured seconds by part) in `stream_validate_steps.json`; and runs the
replay a second time (backend `replay-own`), each run priced by a model fitted on that engine
run's own steps, so the replay's own error shows apart from the profile's.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from adactl import metrics, settings
from adactl.bench.common import (
    StepLog,
    fitted_cost,
    format_table,
    logged_steps,
    one_thread,
    save_figure,
    step_error,
    write_json,
)
from adactl.estimators.step_cost import StepCostProfile
from adactl.loop import ControlLoop
from adactl.profiler import fingerprint, step_cost_for
from adactl.runtime import SLO, Engine, EngineConfig, SamplingParams, Stream, freeze_heap
from adactl.runtime.device import describe
from adactl.runtime.kv_pool import HostOffload
from adactl.runtime.models import kv_bytes_per_token, output_vocab_size
from adactl.runtime.replay import ReplayEngine
from adactl.settings import DeviceSettings, ProfileSettings, RunSettings, WorkloadSettings, floats, ints, setting
from adactl.stacks import StackContext, build_stack, stack_list
from adactl.workloads import (
    Arrival,
    ClosedLoop,
    OpenLoop,
    arrival_times,
    consumer_mix,
    duty_cycle_arrivals,
    long_requests,
)

OWN = "replay-own"  # --validate: the replay priced by a model fitted on the engine run's own steps
WORKLOADS = ("sharegpt", "chat", "long", "mixed-consumers")
LATENESS_P99_S = 1.0  # capacity at SLO: the first unit at most this late (p99) past when it is due
CHAT_MAX_REPLY = 4096  # --workload chat: ShareGPT replies as long as they were, up to this
MACHINE_RATE = 20.0  # units/s (before --slowdown): a reader this fast is a program; priority 0, people 1
MIN_TURNS = 4  # --closed-loop --capacity: with the most sessions tried, each asks this often on average
COLUMNS = ["backend", "load", "served_rate", "controller", "miss_rate", "ttft_p50_s", "ttft_p99_s", "late_p99_s",
           "tpot_s", "admitted_inflight", "little_l", "effective_tps", "rejected", "capacity_at_slo"]  # fmt: skip


@dataclass(frozen=True)
class StreamSettings(WorkloadSettings, RunSettings, DeviceSettings, ProfileSettings):
    """`adactl bench stream`."""

    target: str = setting("smollm2", "the target model")
    loads: list[float] = setting([0.5, 1.0, 1.5, 2.0, 3.0], "requests/s, comma-separated", parse=floats)
    max_new_tokens: int = setting(64, "reply lengths are clipped to this")
    prefill_budget: int = setting(512, "static chunked-prefill budget (tokens)")
    fcfs_seqs: list[int] = setting([8, 16], "max_num_seqs of the tuned FCFS runs", parse=ints)
    max_running: int = setting(16, "edf/andes: requests run per step, at most")
    max_batch: int = setting(64, "KV room: requests in the batch, at most")
    controllers: list[str] | None = setting(None, "the stacks to run, ';'-separated (default: the docstring's; "
                                            "adactl stacks)", parse=stack_list)  # fmt: skip
    replay: bool = setting(False, "profile replay instead of the real engine")
    validate: bool = setting(False, "run engine and replay, report the replay's error")
    replay_noise: float = setting(0.1, "log-sd of replayed step times")
    kv_tokens: int | None = setting(None, "KV memory as 16-token blocks, this many tokens (a prompt waits "
                                    "for its blocks; growth preempts by recompute); 'gpu': what the computed GPU "
                                    "profile's memory holds after its weights; default: no limit but --max-batch",
                                    parse=lambda t: -1 if t == "gpu" else int(t))  # fmt: skip
    kv_offload: float = setting(0.0, "with --kv-tokens: host memory (GiB) for preempted requests' KV, copied out "
                                "and back (over PCIe, for a computed GPU --profile; vLLM's swap space); 0: "
                                "preemption recomputes")  # fmt: skip
    pcie_gb_s: float = setting(25.0, "--kv-offload: host <-> device GB/s per GPU (PCIe 4.0 x16 pinned)")
    quick: bool = setting(False, "2 loads, 16 requests, fcfs; edf; progressserve,ttft-budget")
    workload: str = setting("sharegpt", "sharegpt | chat | long | mixed-consumers: see above",
                            choices=list(WORKLOADS))  # fmt: skip
    long_scale: float = setting(1.0, "--workload long: prompt and reply lengths times this (the real engine "
                                "on a CPU: 0.25 at most; 0.125: 512-2048-token prompts, 37-100-token "
                                "replies)")  # fmt: skip
    slowdown: float = setting(1.0, "readers read this many times slower, and their first unit and the lateness "
                              "SLO are this many times later: the workload's regime in slow motion, for a "
                              "machine this many times slower than the GPU it is meant for")  # fmt: skip
    warmup: float = setting(0.0, "this fraction of the requests (the first to arrive) is served, not measured")
    seeds: int = setting(1, "seeds (arrivals, readers, request order) pooled at every point")
    capacity: bool = setting(False, "--replay: each stack's capacity at SLO by bisection over the arrival rate "
                             "(the first --loads value is where the search starts)")  # fmt: skip
    capacity_tolerance: float = setting(0.05, "--capacity: stop when the bracket is this narrow (relative)")
    capacity_span: float = setting(30.0, "--capacity: the highest rate tried is --requests / this many seconds of "
                                   "arrivals (above it a run is one burst, not a load)")  # fmt: skip
    closed_loop: bool = setting(False, "sessions instead of open-loop arrivals: each --loads value is a number of "
                                "users who ask, read the whole reply, think --think s and ask again "
                                "(`workloads.ClosedLoop`); --capacity finds the most sessions at SLO")  # fmt: skip
    think: float = setting(10.0, "--closed-loop: a session's mean think time (seconds, exponential) between "
                           "reading a reply and asking again")  # fmt: skip

    def resolved(self) -> StreamSettings:
        """--quick applied."""
        if not self.quick:
            return self
        return replace(self, loads=self.loads[:2], requests=min(self.requests, 16), fcfs_seqs=self.fcfs_seqs[:1],
                       controllers=self.controllers or ["fcfs", "edf", "progressserve,ttft-budget"])  # fmt: skip


def stacks(fcfs_seqs: list[int]) -> list[str]:
    """The stacks of a sweep (names from `adactl.stacks`)."""
    return ["fcfs", *(f"fcfs-seqs{n}" for n in fcfs_seqs), "edf", "andes", "fcfs,ttft-budget",
            "progressserve,ttft-budget"]  # fmt: skip


def serve(engine: Any, stack: list[Any], requests: list[tuple[Any, int]], streams: list[Stream],
          times: list[float] | int, args: StreamSettings, bar: tqdm, priced_by: Any = None,
          seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Serve the requests on `engine` (real or replay) and measure the consumers: open loop at
    `times`, or (an int) that many closed-loop sessions, session s read by `streams[s]`
    (think times drawn from `seed`); `priced_by`: the replay's step-cost model, to price the
    real engine's own steps with (`step_error`: the step-time part of the replay's error, apart
    from its dynamics)."""
    replay = isinstance(engine, ReplayEngine)
    loop = ControlLoop(engine, schedule=stack, max_draft_len=0, prefill_budget=args.prefill_budget,
                       clock=engine.clock if replay else time.perf_counter)  # fmt: skip
    sleep = engine.sleep if replay else time.sleep
    at = [0.0] * len(requests) if isinstance(times, int) else times  # (a closed loop's asks wait for sessions)
    arrivals = [Arrival(at[i], prompt, SamplingParams(length, stop_on_eos=False, seed=args.seed + i), streams[i],
                        SLO(priority=_priority(streams[i], args)))
                for i, (prompt, length) in enumerate(requests)]  # fmt: skip
    if isinstance(times, int):  # session s: reader streams[s], and the priority that reader gives
        slos = [a.slo for a in arrivals[:times]]
        driver: OpenLoop = ClosedLoop(loop, arrivals, streams[:times], args.think, loop.clock, sleep, seed, slos)
    else:
        driver = OpenLoop(loop, arrivals, loop.clock, sleep)
    inflight_area = 0.0
    timeline: list[tuple[float, int]] = []
    log = StepLog() if priced_by is not None and not replay else None  # (no per-step shapes unless priced)
    reasons: Counter[str] = Counter()  # request-steps per reason a controller gave for a waiting request

    def on_step(record: Any) -> None:
        nonlocal inflight_area
        if log is not None:
            log.update(record)
        for controller in stack:  # the numbers in a reason vary: '#' for each, so reasons group
            reasons.update(re.sub(r"\d[\d.,]*", "#", why) for why in getattr(controller, "reasons", {}).values())
        admitted = sum(v.status != "waiting" for v in record.schedule.requests)
        inflight_area += admitted * record.outcome.total_s
        timeline.append((driver.elapsed(), admitted))
        bar.update(record.outcome.tokens_emitted)

    wall = driver.run(on_step)
    ids = driver.index
    warm = int(args.warmup * len(arrivals))  # served, not measured
    measured = [r for rid, r in loop.results.items() if ids[rid] >= warm]
    on_time_tokens = 0.0
    by_unit: dict[str, list[int]] = {}  # unit kind -> [units, misses]
    late, token_late = [], []  # first unit past its due time (the SLO's); first token past the TTFT
    for result in measured:
        u, m = result.stream_units or 0, result.stream_misses or 0
        stream = driver.arrivals[ids[result.request_id]].stream
        kind = by_unit.setdefault(stream.unit, [0, 0])
        kind[0], kind[1] = kind[0] + u, kind[1] + m
        on_time_tokens += len(result.output_ids) * max(0.0, 1 - m / u) if u else 0.0
        first = result.first_token_time if result.first_token_time is not None else result.finish_time
        # a word or sentence reader's first unit is due one unit period after the TTFT (the time
        # it takes to read to its end, `Stream.first_unit_s`): the "first-unit lateness"
        late.append(max(0.0, first - result.arrival_time - stream.first_unit_s))
        token_late.append(max(0.0, first - result.arrival_time - stream.ttft_s))
    units, misses = metrics.unit_misses(measured)
    rejected = sum(i >= warm for i in driver.rejected)
    # Little's L = lambda * W over the measured requests: what "in flight" means for an open loop
    span = max((r.finish_time for r in measured), default=0.0) - min((r.arrival_time for r in measured), default=0.0)
    rate = len(measured) / max(span, 1e-9)  # requests/s served, first arrival to last finish (a closed loop's
    # sessions set it): the lambda of Little's L
    little = rate * float(np.mean([r.finish_time - r.arrival_time for r in measured] or [0]))
    return {
        metrics.MISS_RATE: misses / max(units, 1),
        "units": units,
        "misses": misses,
        "misses_by_unit": {k: {"units": u, "misses": m} for k, (u, m) in sorted(by_unit.items())},
        **metrics.latency_summary(*metrics.latencies(measured)),
        "late": late,
        "token_late": token_late,
        **{p99: _p99(values) for p99, values in (("late_p99_s", late), ("first_token_late_p99_s", token_late))},
        "rejected": rejected,
        "rejections": sorted(set(driver.rejected.values()))[:3],
        "admitted_inflight": inflight_area / max(wall, 1e-9),
        "little_l": little,
        "served_rate": rate,
        "effective_tps": on_time_tokens / max(wall, 1e-9),
        "wall_s": wall,
        "requests": len(loop.results),
        "fallbacks": dict(loop.fallbacks),
        "reasons": dict(reasons.most_common()),
        "inflight_timeline": timeline[:: max(1, len(timeline) // 200)],
        **engine.kv_stats(),
        **({"step_error": step_error(priced_by, log.steps), "step_log": log.steps} if log is not None else {}),
    }


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else 0.0


def _priority(stream: Stream, args: StreamSettings) -> int:
    """A request's `SLO.priority` (what `vllm-v1-priority` orders by): programs reading faster
    than any person (the mixed workload's machine consumers) 0, people 1."""
    return 0 if stream.rate * args.slowdown >= MACHINE_RATE else 1


def at_slo(record: dict[str, Any]) -> bool:
    """Whether a served point meets the streaming SLO: missed units <= 0.5% of units, the first
    unit at most 1 s late past when it is due at p99 (for a token reader the TTFT target; for
    words and sentences one unit period later), and no request refused."""
    lateness = record.get("slo_lateness_s", LATENESS_P99_S)  # (--slowdown scales it)
    return (record[metrics.MISS_RATE] <= metrics.SLO_MISS_RATE and record["late_p99_s"] <= lateness
            and record["rejected"] == 0)  # fmt: skip


def add_capacity(records: list[dict[str, Any]]) -> None:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["backend"], r["controller"]), []).append(r)
    for rows in groups.values():
        ok = [r for r in rows if at_slo(r)]
        best = max(ok, key=lambda r: r["load"]) if ok else None
        for r in rows:
            r["capacity_at_slo"] = best["load"] if best else 0.0
            r["capacity_inflight"] = best["admitted_inflight"] if best else 0.0


def plot(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["backend"] for r in records))
    fig, axes = plt.subplots(len(backends), 2, figsize=(13, 4.6 * len(backends)), squeeze=False)
    for row, backend in zip(axes, backends):
        mine = [r for r in records if r["backend"] == backend]
        names = list(dict.fromkeys(r["controller"] for r in mine))
        top = max(r["load"] for r in mine)
        for name in names:
            rs = sorted((r for r in mine if r["controller"] == name), key=lambda r: r["load"])
            row[0].plot([r["load"] for r in rs], [100 * r["miss_rate"] for r in rs], marker="o", label=name)
            tl = rs[-1]["inflight_timeline"]  # at its highest load (--capacity: each stack has its own)
            row[1].plot([t for t, _ in tl], [n for _, n in tl], label=name)
        row[0].axhline(100 * metrics.SLO_MISS_RATE, color="gray", ls="--", lw=1)
        row[0].set(xlabel="load (requests/s)", ylabel="missed units (%)", title=f"{backend}: misses vs load")
        row[0].set_yscale("symlog", linthresh=0.5)
        row[1].set(xlabel="seconds", ylabel="admitted in-flight requests", title=f"{backend}: in flight at the "
                   f"highest load run ({top}/s for the sweep)")  # fmt: skip
        row[0].legend(fontsize=7)
        row[1].legend(fontsize=7)
    save_figure(fig, path, title)


def _streams(args: StreamSettings, n: int, seed: int) -> list[Stream]:
    """The readers of `n` requests for the workload (see the module docstring)."""
    machines = 0.15 if args.workload == "mixed-consumers" else 0.0
    tokens_only = args.consumers == "tokens" or args.workload in ("long", "mixed-consumers")
    mix = consumer_mix(n, seed, args.ttft, tokens_only=tokens_only, machines=machines)
    if args.slowdown == 1.0:
        return mix
    return [Stream(r.rate / args.slowdown, r.unit, r.ttft_s * args.slowdown) for r in mix]


def _arrivals(args: StreamSettings, n: int, load: float, seed: int) -> list[float]:
    """Arrival times at `load` requests/s: duty-cycle bursts for `long`, else Gamma gaps."""
    if args.workload == "long":
        return duty_cycle_arrivals(n, load, seed, cv=2.5 if args.burstiness == 1.0 else args.burstiness**-0.5)
    return arrival_times(n, load, seed, args.burstiness)


def _workload(args: StreamSettings) -> tuple[Any, list[tuple[Any, int]], list[Stream]]:
    """(the target alone as a `ModelPair`, requests, streams): streaming serves plain decoding."""
    from adactl.runtime.device import device_and_dtype
    from adactl.runtime.models import LoadedModel, ModelPair, load_pair

    device, dtype = device_and_dtype(args.device, args.dtype)  # before anything loads
    streams = _streams(args, args.requests, args.seed)
    if args.workload == "long" and not args.replay and args.long_scale > 0.25:
        raise SystemExit("adactl bench stream --workload long on the real engine: its prompts are 4-16k tokens; "
                         "scale them down (--long-scale 0.125) or give --replay")  # fmt: skip
    if args.tiny:
        from adactl.runtime.models import tiny_llama

        long = args.workload == "long"
        longest = int(17_184 * args.long_scale) + 64  # (--workload long: its longest prompt and reply)
        target = tiny_llama(max_positions=max(512, longest) if long else 512).to(device, dtype)
        g = torch.Generator().manual_seed(args.seed)
        lengths = zip(torch.randint(4, 24, (args.requests,)), torch.randint(8, 24, (args.requests,)))
        reqs = [(torch.randint(1, 128, (int(k),), generator=g).tolist(), int(n)) for k, n in lengths]
        reqs = _long(args, target) if long else reqs
        pair = ModelPair(LoadedModel(target, None, "tiny-stream"), None, None, device, dtype,
                         {"target": "tiny-stream", "draft": "none", "companion": "none"})  # fmt: skip
        return pair, reqs, [Stream(s.rate, "token", s.ttft_s) for s in streams]
    from adactl.workloads import built_apart, chat_requests, read_sharegpt

    pair = load_pair(args.target, None, None, device, dtype)
    if args.workload == "long":
        return pair, _long(args, pair.target.model), streams
    replies = CHAT_MAX_REPLY if args.workload == "chat" else args.max_new_tokens
    try:  # the replay learns nothing from them: every record, for sweeps of 1,000 requests and more
        reqs = built_apart(lambda: chat_requests(pair.tokenizer, args.requests, args.max_prompt_tokens, replies,
                                                 read_sharegpt(), held_out=not args.replay))  # fmt: skip
    except ValueError as e:
        fix = "ask for fewer --requests or a longer --max-prompt-tokens"
        raise SystemExit(f"adactl bench stream: {e}; {fix}") from None
    return pair, list(reqs), streams


def _long(args: StreamSettings, target: Any) -> list[tuple[list[int], int]]:
    """--workload long's requests, scaled by --long-scale: random token ids (summaries of
    documents nobody reads here; the replay sees lengths only)."""
    if not 0 < args.long_scale <= 1:
        raise SystemExit(f"adactl bench stream: --long-scale must be in (0, 1], got {args.long_scale}")
    s = args.long_scale
    lengths = long_requests(args.requests, args.seed, prompt=(max(16, int(4096 * s)), max(32, int(16384 * s))),
                            reply=(max(4, int(300 * s)), max(8, int(800 * s))))  # fmt: skip
    g = torch.Generator().manual_seed(args.seed)
    vocab = output_vocab_size(target)
    return [(torch.randint(1, vocab, (n,), generator=g).tolist(), m) for n, m in lengths]


def _physics(args: StreamSettings) -> Any:
    """The physics of the computed GPU profile named by --profile (`GpuStepCost`), else None."""
    from adactl.bench.spec_replay import truth
    from adactl.estimators.gpu_cost import GpuStepCost
    from adactl.profiler import named_profile

    cost = truth(StepCostProfile.load(named_profile(args.profile))) if args.profile else None
    return cost if isinstance(cost, GpuStepCost) else None


def _gpu(args: StreamSettings, option: str) -> Any:
    """The physics of the computed GPU profile named by --profile (`option` needs one)."""
    cost = _physics(args)
    if cost is None:
        raise SystemExit(f"adactl bench stream {option} needs --profile naming a computed GPU profile "
                         "(e.g. h100-llama-3.1-8b)")  # fmt: skip
    return cost


def _kv_tokens(args: StreamSettings) -> int | None:
    """--kv-tokens: a number, or (-1) what the computed GPU profile named by --profile holds."""
    if args.kv_tokens is None or args.kv_tokens > 0:
        return args.kv_tokens
    return int(_gpu(args, "--kv-tokens gpu (or a number of tokens)").kv_tokens())


def _offload(args: StreamSettings, target: Any) -> HostOffload | None:
    """--kv-offload GiB of host memory for preempted KV, at --pcie-gb-s per GPU (each of a
    tensor-parallel group's GPUs copies its shard over its own link): a computed GPU profile's
    model's KV, else `target`'s (the real engine's own copies are timed, not priced)."""
    if args.kv_offload == 0:
        return None
    if args.kv_offload < 0 or not args.pcie_gb_s > 0:
        raise SystemExit(f"adactl bench stream: --kv-offload must be >= 0 GiB and --pcie-gb-s > 0, got "
                         f"{args.kv_offload}, {args.pcie_gb_s}")  # fmt: skip
    if args.kv_tokens is None:
        raise SystemExit("adactl bench stream --kv-offload: offload is from a KV pool; give --kv-tokens")
    cost = _physics(args)
    if cost is None:
        per_token = float(kv_bytes_per_token(target))
        return HostOffload(int(args.kv_offload * 2**30 / per_token), per_token, args.pcie_gb_s * 1e9)
    per_token = cost.model.kv_bytes_per_token(cost.bytes_per_param)
    return HostOffload(int(args.kv_offload * 2**30 / per_token), per_token / cost.tp, args.pcie_gb_s * 1e9)


def main(namespace: argparse.Namespace) -> list[dict[str, Any]]:
    args = settings.from_args(StreamSettings, namespace)
    with one_thread(args.replay):  # a replay runs no model: its tensors are the controllers'
        return run(args)


def _check(args: StreamSettings) -> None:
    """Settings that cannot run together, each refused with what to do instead."""
    if not args.slowdown > 0:
        raise SystemExit(f"adactl bench stream: --slowdown must be > 0, got {args.slowdown}")
    if args.seeds < 1 or not 0 <= args.warmup < 1 or not 0 < args.capacity_tolerance < 1 or args.capacity_span <= 0:
        raise SystemExit(f"adactl bench stream: --seeds must be >= 1, --warmup in [0, 1), --capacity-tolerance in "
                         f"(0, 1) and --capacity-span > 0; got {args.seeds}, {args.warmup}, {args.capacity_tolerance}, "
                         f"{args.capacity_span}")  # fmt: skip
    if args.capacity and not args.replay:
        raise SystemExit("adactl bench stream --capacity: the bisection serves dozens of points; give --replay")
    if args.validate and args.seeds > 1:
        raise SystemExit("adactl bench stream --validate compares one engine run per point: --seeds 1")
    if any(load <= 0 for load in args.loads):
        raise SystemExit(f"adactl bench stream: --loads must be > 0 requests/s, got {args.loads}")
    if args.closed_loop:
        if any(load != int(load) or load > args.requests for load in args.loads):
            raise SystemExit(f"adactl bench stream --closed-loop: --loads are numbers of sessions, whole and at most "
                             f"--requests ({args.requests}); got {args.loads}")  # fmt: skip
        if not args.think >= 0:
            raise SystemExit(f"adactl bench stream --closed-loop: --think must be >= 0 s, got {args.think}")
        if args.capacity and args.loads[0] > args.requests // MIN_TURNS:
            raise SystemExit(f"adactl bench stream --closed-loop --capacity: start at most --requests / {MIN_TURNS} "
                             f"= {args.requests // MIN_TURNS} sessions (each asks {MIN_TURNS} times), got "
                             f"{args.loads[0]:g}; give more --requests")  # fmt: skip


def pooled(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One point served with several seeds: units, misses and refusals summed, first-token
    lateness pooled before its p99, the other figures averaged over the seeds."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    for key in ("units", "misses", "rejected", "requests"):
        out[key] = sum(r[key] for r in results)
    out[metrics.MISS_RATE] = out["misses"] / max(out["units"], 1)
    for key, p99 in (("late", "late_p99_s"), ("token_late", "first_token_late_p99_s")):  # pooled, then the p99
        out[key] = [x for r in results for x in r[key]]
        out[p99] = _p99(out[key])
    for key in (metrics.TTFT_P50, metrics.TTFT_P99, metrics.TPOT, "admitted_inflight", "little_l", "served_rate",
                "effective_tps", "wall_s"):  # fmt: skip
        values = [r[key] for r in results if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    for key in [k for k in out if k.startswith("kv_") and k not in ("kv_blocks", "kv_used")]:  # counts, not states
        out[key] = sum(r.get(key, 0) for r in results)
    out["misses_by_unit"] = {unit: {n: sum(r["misses_by_unit"].get(unit, {}).get(n, 0) for r in results)
                                    for n in ("units", "misses")}
                             for unit in sorted({u for r in results for u in r["misses_by_unit"]})}  # fmt: skip
    out["reasons"] = dict(sum((Counter(r["reasons"]) for r in results), Counter()).most_common())
    out["seeds"] = len(results)
    return out


def capacity_search(at: Any, start: float, tolerance: float = 0.05, limit: int = 14, halvings: int = 4,
                    highest: float = float("inf"),
                    integer: bool = False) -> tuple[float, bool, list[dict]]:  # fmt: skip
    """The largest arrival rate whose point meets the SLO (`at_slo`; `at(load)` serves one):
    doubling from `start` until a point misses (or halving, at most `halvings` times, until one
    meets it), then bisection until the bracket is within `tolerance` of its lower end, at most
    `limit` points, and no rate above `highest` (a finite workload: above it every request
    arrives at once). 0 where even the lowest tried misses (below start / 2**halvings a replayed
    run is mostly single-request steps, the slowest to replay, and a capacity that low is a
    finding of its own). Assumes a load that misses is not followed by a higher one
    that meets the SLO (it is not looked for). Returns the capacity, whether a load above it
    was seen to miss (False: the capacity is a lower bound, every load tried met the SLO) and
    the points served. `integer`: loads are whole numbers (closed-loop sessions), and a
    bracket of adjacent ones ends the search too."""
    tried: list[dict[str, Any]] = []

    def ok(load: float) -> bool:
        tried.append(at(load))
        return at_slo(tried[-1])

    def fine(x: float) -> float:
        return float(int(x)) if integer else x

    highest = math.floor(highest) if integer and highest < float("inf") else highest
    lo, hi, x = 0.0, float("inf"), fine(min(start, highest))
    if integer and x < 1:
        raise ValueError(f"a search over whole loads starts at 1 or more, got {start} (at most {highest})")
    if ok(x):
        lo = x
        while hi == float("inf") and len(tried) < limit and x < highest:
            x = fine(min(2 * x, highest))
            lo, hi = (x, hi) if ok(x) else (lo, x)
    else:
        hi = x
        while lo == 0.0 and len(tried) <= halvings and fine(x / 2) > 0:
            x = fine(x / 2)
            lo, hi = (x, hi) if ok(x) else (lo, x)
    closest = 1.0 if integer else 0.0  # adjacent whole loads end the search
    while lo > 0 and hi < float("inf") and hi - lo > max(tolerance * lo, closest) and len(tried) < limit:
        mid = fine((lo + hi) / 2)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, hi < float("inf"), tried


def run(args: StreamSettings) -> list[dict[str, Any]]:
    args = args.resolved()
    _check(args)
    torch.manual_seed(args.seed)
    pair, requests, streams = _workload(args)
    target, tokenizer = pair.target.model, pair.tokenizer
    # the controllers' step costs: this machine's profile of the target alone, refined online;
    # the replay engine's: the same profile, frozen (it is the replay's ground truth); a computed
    # GPU profile's physics itself, as `bench spec --replay` and `bench serve --replay` have it
    step_time = step_cost_for(pair, args.profile, args.refine, max_batch=args.max_batch)
    replay_time = _physics(args) or step_time.frozen()
    if not args.replay:
        freeze_heap()  # no full collection over the loaded model's objects inside a timed step
    ctx = StackContext(step_time, prefill_budget=args.prefill_budget, max_running=args.max_running)
    chosen = args.controllers or stacks(args.fcfs_seqs)
    backends = ["replay"] if args.replay else ["engine", "replay", OWN] if args.validate else ["engine"]
    kv_tokens = _kv_tokens(args)
    offload = _offload(args, target)
    host_tokens = offload.host_tokens if offload is not None else 0
    priced_by = replay_time if args.validate else None  # the engine's own steps, priced by the replay's model
    fp = fingerprint(pair.model_ids, pair.device, pair.dtype)
    own: dict[tuple[float, str], Any] = {}  # --validate: each engine run's steps, fitted (the replay-own backend)
    records: list[dict[str, Any]] = []
    per_point = sum(n for _, n in requests) * args.seeds
    total = None if args.capacity else per_point * len(chosen) * len(args.loads) * len(backends)
    bar = tqdm(total=total, desc="bench stream", unit="tok")
    max_context = max(8192, max(len(p) + n for p, n in requests) + 1)

    def point(backend: str, load: float, name: str) -> dict[str, Any]:
        """`name` serving the workload at `load` on `backend`, every seed, pooled."""
        results = []
        for k in range(args.seeds):
            seed = args.seed + k
            order = requests if k == 0 else random.Random(seed).sample(requests, len(requests))
            readers = streams if k == 0 else _streams(args, len(requests), seed)
            times = int(load) if args.closed_loop else _arrivals(args, len(requests), load, seed)
            if backend == "engine":
                config = EngineConfig(max_batch_size=args.max_batch, kv_tokens=kv_tokens, host_kv_tokens=host_tokens)
                engine: Any = Engine(target, None, tokenizer, config=config)
            else:
                cost = own[(load, name)] if backend == OWN else replay_time
                engine = ReplayEngine(cost, max_batch_size=args.max_batch, noise=args.replay_noise, seed=seed,
                                      kv_tokens=kv_tokens, offload=copy.deepcopy(offload),
                                      max_context=max_context)  # fmt: skip
            work = order if backend == "engine" else [(len(p), n) for p, n in order]
            stack = build_stack(name, replace(ctx, seed=seed)).schedule  # (its own draws, seed by seed)
            result = serve(engine, stack, work, readers, times, args, bar, priced_by, seed)
            if "step_log" in result:
                own[(load, name)] = fitted_cost(fp, result["step_log"], f"{name} at load {load}")
            results.append(result)
        return {"backend": backend, "load": load, "controller": name, **pooled(results),
                "slo_lateness_s": LATENESS_P99_S * args.slowdown}  # fmt: skip

    capacities: list[dict[str, Any]] = []
    # the most a capacity search tries: a rate at which the requests arrive over --capacity-span
    # seconds, or as many sessions as ask MIN_TURNS times each (more, and a run is one burst)
    highest = len(requests) // MIN_TURNS if args.closed_loop else len(requests) / args.capacity_span
    if args.capacity:
        for name in chosen:
            found, bounded, tried = capacity_search(lambda load, name=name: point("replay", load, name),
                                                    args.loads[0], args.capacity_tolerance, highest=highest,
                                                    integer=args.closed_loop)  # fmt: skip
            for r in tried:
                r["capacity_at_slo"] = found
            records += sorted(tried, key=lambda r: r["load"])
            capacities.append({"controller": name, "capacity_at_slo": found, "bounded": bounded, "points": len(tried)})
        reference = next((c for c in sorted(capacities, key=lambda c: -c["capacity_at_slo"])
                          if c["controller"].startswith("vllm-v1")), capacities[0])  # fmt: skip
        base = reference["capacity_at_slo"]
        for c in capacities:
            c["vs_reference"], c["reference"] = (c["capacity_at_slo"] / base if base else None), reference["controller"]
    else:
        for backend in backends:
            for load in args.loads:
                for name in chosen:
                    records.append(point(backend, load, name))
        add_capacity(records)
    bar.close()
    summary = validation(records) if args.validate else None
    print(format_table(records, COLUMNS))
    if capacities:
        print(format_table(capacities, ["controller", "capacity_at_slo", "bounded", "vs_reference", "reference",
                                        "points"]))  # fmt: skip
        if not all(c["bounded"] for c in capacities):
            span = f"{len(requests)} requests arrive in {args.capacity_span:g} s"
            cap = (f"{highest} sessions, each asking {MIN_TURNS} of the {len(requests)} requests" if args.closed_loop
                   else f"{highest:g} requests/s, where {span}")  # fmt: skip
            print(f"(bounded False: every load tried met the SLO (at most {cap}, are tried): the capacity is at "
                  "least this; more --requests measure higher)")  # fmt: skip
    if summary:
        print("replay vs engine:", summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"target": "tiny" if args.tiny else args.target, "validation": summary, "capacity": capacities or None,
            "machine": describe(pair.device, pair.dtype).to_dict(),
            "args": asdict(args)}  # fmt: skip
    logged = [{"load": r["load"], "controller": r["controller"], "steps": logged_steps(r.pop("step_log"))}
              for r in records if "step_log" in r]  # fmt: skip
    if logged:  # --validate: the engine's steps, shapes and measured seconds
        write_json(out / "stream_validate_steps.json", logged, {"profile": args.profile or "this machine's (cached)"})
    for r in records:
        r.pop("late", None)
        r.pop("token_late", None)
    write_json(out / "stream.json", records, meta)
    plot(records, out / "stream.png", f"adactl bench stream: {meta['target']}, {meta['machine']['label']}")
    return records


def validation(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The replay's error against the engine on the same (load, controller) runs: priced by
    the profile (what a user of the replay gets), and priced by each run's own steps (`OWN`:
    the replay's dynamics alone, the profile's error left out)."""
    out: dict[str, Any] = _errors(records, "replay")
    own = _errors(records, OWN)
    if own:
        out[OWN] = own
    return out


def _errors(records: list[dict[str, Any]], backend: str) -> dict[str, float]:
    engine = {(r["load"], r["controller"]): r for r in records if r["backend"] == "engine"}
    pairs = [(engine[(r["load"], r["controller"])], r) for r in records
             if r["backend"] == backend and (r["load"], r["controller"]) in engine]  # fmt: skip
    if not pairs:
        return {}

    priced = [abs(a["step_error"]["total"]) for a, _ in pairs if "step_error" in a]

    def rel(key: str) -> float:
        vals = [abs(b[key] - a[key]) / a[key] for a, b in pairs if a.get(key) and b.get(key) is not None]
        return float(np.mean(vals)) if vals else float("nan")

    return {
        "runs": len(pairs),
        "miss_rate_abs_error": float(np.mean([abs(b["miss_rate"] - a["miss_rate"]) for a, b in pairs])),
        "tpot_rel_error": rel("tpot_s"),
        "ttft_p50_rel_error": rel("ttft_p50_s"),
        "inflight_rel_error": rel("admitted_inflight"),
        **({"step_time_rel_error": float(np.mean(priced)) if priced else float("nan")} if backend == "replay" else {}),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, StreamSettings)
