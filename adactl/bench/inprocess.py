"""`adactl bench inprocess`: `adactl bench serve`'s workload served in-process (no HTTP), a
diagnostic: one controller stack on the real engine, open-loop ShareGPT arrivals (held out)
with token readers, engine-side accounting, and what speculation did (steps by their longest
draft, draft tokens accepted of those verified).

    adactl bench inprocess --stack progressserve --rate 2.5 --ignore-eos
    adactl bench inprocess --stack fcfs,goodput --rate 1 --draft draft

It found, for example, ProgressServe's misses before and after the row-layout fix, and what
the goodput controller drafts when served (docs/bench_serve.md).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from adactl import metrics, settings
from adactl.loop import ControlLoop
from adactl.profiler import step_cost_for
from adactl.runtime import Engine, EngineConfig, SamplingParams, freeze_heap
from adactl.settings import DeviceSettings, ProfileSettings, setting
from adactl.stacks import StackContext, build_stack, costs_steps, one_stack, untrained_acceptance
from adactl.workloads import Arrival, OpenLoop, arrival_times, consumer_mix


def main(namespace: argparse.Namespace) -> dict[str, Any]:
    return run(settings.from_args(InprocessSettings, namespace))


def run(args: InprocessSettings) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    pair, requests = _workload(args)
    target = pair.target
    streams = consumer_mix(args.requests, args.seed, 1.0, tokens_only=True)
    times = arrival_times(args.requests, args.rate, args.seed)
    engine = Engine(target.model, pair.draft, target.tokenizer, EngineConfig(max_batch_size=64))
    step_time = step_cost_for(pair, args.profile, args.refine) if costs_steps(args.stack) else None
    stack = build_stack(args.stack, StackContext(step_time, _acceptance(args.tiny), 512))
    loop = ControlLoop(engine, stack.schedule, stack.verify, max_draft_len=8 if pair.draft is not None else 0)
    freeze_heap()  # as a server does once loaded
    arrivals = [Arrival(times[i], prompt, SamplingParams(n, stop_on_eos=not args.ignore_eos, seed=args.seed + i),
                        streams[i]) for i, (prompt, n) in enumerate(requests)]  # fmt: skip

    drafts: Counter[int] = Counter()  # steps by the longest draft in them
    verified = accepted = 0
    bar = tqdm(total=sum(n for _, n in requests), desc=f"bench inprocess {args.stack}", unit="tok")

    def on_step(record: Any) -> None:
        nonlocal verified, accepted
        if record.drafts.draft_len.numel():
            drafts[int(record.drafts.draft_len.max())] += 1
        verified += int(record.outcome.verified.sum())
        accepted += int(record.outcome.accepted.sum())
        bar.update(record.outcome.tokens_emitted)

    wall = OpenLoop(loop, arrivals).run(on_step)
    bar.close()
    summary = metrics.serving_summary(list(loop.results.values()), wall)
    summary.update(steps_by_longest_draft=dict(sorted(drafts.items())), verified=verified, accepted=accepted)
    print(f"{args.stack} at {args.rate}/s, draft {args.draft}: {summary['tokens_per_s']:.1f} tok/s, "
          f"misses {100 * summary[metrics.MISS_RATE]:.1f}% ({summary['misses']}/{summary['units']}), "
          f"steps by longest draft {summary['steps_by_longest_draft']}, "
          f"accepted {accepted}/{verified} verified draft tokens")  # fmt: skip
    return summary


def _acceptance(tiny: bool) -> Any:
    if tiny:
        return untrained_acceptance
    from adactl.estimators import load_acceptance

    return load_acceptance


def _workload(args: InprocessSettings) -> tuple[Any, list[tuple[Any, int]]]:
    """The model pair and (prompt ids, reply length) of each request."""
    from adactl.runtime.models import load_pair

    if args.tiny:
        from adactl.profiler import tiny_pair
        from adactl.runtime.models import ModelPair

        pair = tiny_pair("cpu", torch.float32)
        if args.draft in (None, "", "none"):
            pair = ModelPair(pair.target, None, None, pair.device, pair.dtype, {**pair.specs, "draft": "none"})
        g = torch.Generator().manual_seed(args.seed)
        lengths = zip(torch.randint(4, 24, (args.requests,)), torch.randint(8, 24, (args.requests,)))
        return pair, [(torch.randint(1, 128, (int(k),), generator=g).tolist(), int(n)) for k, n in lengths]
    from adactl.workloads import built_apart, chat_requests, read_sharegpt

    pair = load_pair("smollm2", args.draft, None, args.device, args.dtype)
    requests = built_apart(lambda: chat_requests(pair.tokenizer, args.requests, 128, 64, read_sharegpt(),
                                                 held_out=True))  # fmt: skip
    return pair, list(requests)


@dataclass(frozen=True)
class InprocessSettings(DeviceSettings, ProfileSettings):
    """`adactl bench inprocess`."""

    stack: str = setting("fcfs", "a controller stack (adactl stacks)", parse=one_stack)
    rate: float = setting(2.5, "requests/s (Poisson)")
    requests: int = setting(90, "requests in the run")
    draft: str | None = setting(None, "a draft model (default: none)")
    ignore_eos: bool = setting(False, "generate each recorded reply length in full")
    seed: int = setting(0, "seed of prompts, arrivals, readers and sampling")
    tiny: bool = setting(False, "tiny random models (a smoke run)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, InprocessSettings)
