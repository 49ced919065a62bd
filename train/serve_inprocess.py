"""Serve `adactl bench serve`'s workload in-process (no HTTP): a controller stack on the real
engine, open-loop ShareGPT arrivals with token readers, engine-side accounting.

The diagnostic behind the in-process numbers of docs/bench_serve.md (ProgressServe's misses before and after
the row-layout fix; what the goodput controller drafts when served):

    python train/serve_inprocess.py --stack progressserve --rate 2.5 --ignore-eos
    python train/serve_inprocess.py --stack fcfs,goodput --rate 1 --draft draft
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from adactl.loop import ControlLoop
from adactl.runtime import Engine, EngineConfig, SamplingParams
from adactl.estimators import load_acceptance
from adactl.profiler import add_profile_arguments, step_cost_for
from adactl.runtime.device import add_device_arguments
from adactl.runtime.models import load_pair
from adactl.stacks import StackContext, build_stack, costs_steps
from adactl.workloads import arrival_times, chat_requests, consumer_mix, read_sharegpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", default="fcfs", help="a controller stack, as adactl serve --controllers")
    parser.add_argument("--rate", type=float, default=2.5, help="requests/s (Poisson)")
    parser.add_argument("--requests", type=int, default=90)
    parser.add_argument("--draft", default=None, help="a draft model (default: none)")
    parser.add_argument("--ignore-eos", action="store_true", help="generate each recorded reply length in full")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)
    add_profile_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(2)

    pair = load_pair("smollm2", args.draft, None, args.device, args.dtype)
    target, draft = pair.target, pair.draft
    reqs = chat_requests(target.tokenizer, args.requests, 128, 64, read_sharegpt(), held_out=True)
    streams = consumer_mix(args.requests, args.seed, 1.0, tokens_only=True)
    times = arrival_times(args.requests, args.rate, args.seed)
    engine = Engine(target.model, draft, target.tokenizer, EngineConfig(max_batch_size=64))
    ctx = StackContext(step_cost_for(pair, args.profile, args.refine) if costs_steps(args.stack) else None,
                       load_acceptance, 512)  # fmt: skip
    stack = build_stack(args.stack, ctx)
    loop = ControlLoop(engine, stack.schedule, stack.verify, max_draft_len=8 if draft is not None else 0)

    drafts: Counter[int] = Counter()  # steps by the longest draft in them
    verified = accepted = 0
    start, queue = time.perf_counter(), list(range(args.requests))
    while queue or engine.has_unfinished():
        now = time.perf_counter() - start
        while queue and times[queue[0]] <= now:
            i = queue.pop(0)
            prompt, n = reqs[i]
            engine.add_request(prompt, SamplingParams(n, stop_on_eos=not args.ignore_eos), arrival_time=start + times[i], stream=streams[i])
        if not engine.has_unfinished():
            time.sleep(max(0.0, times[queue[0]] - now))
            continue
        record = loop.step()
        if record.drafts.draft_len.numel():
            drafts[int(record.drafts.draft_len.max())] += 1
        verified += int(record.outcome.verified.sum())
        accepted += int(record.outcome.accepted.sum())
    wall = time.perf_counter() - start
    results = loop.results.values()
    tokens = sum(len(r.output_ids) for r in results)
    units = sum(r.stream_units or 0 for r in results)
    misses = sum(r.stream_misses or 0 for r in results)
    print(f"{args.stack} at {args.rate}/s, draft {args.draft}: {tokens / wall:.1f} tok/s, "
          f"misses {100 * misses / max(units, 1):.1f}% ({misses}/{units}), steps by longest draft {dict(drafts)}, "
          f"accepted {accepted}/{verified} verified draft tokens")  # fmt: skip


if __name__ == "__main__":
    main()
