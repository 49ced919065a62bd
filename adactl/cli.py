"""The `adactl` command line: `adactl serve`, `adactl profile`, `adactl stacks` and
`adactl bench spec | stream | serve | inprocess | runtime | step | draft`."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adactl", description="Online control of LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    from adactl.server import main as serve_main

    serve_parser = commands.add_parser("serve", help="an OpenAI-compatible streaming server with the controllers")
    serve_main.add_arguments(serve_parser)
    serve_parser.set_defaults(run=serve_main.main)
    from adactl import profiler

    profile_parser = commands.add_parser("profile", help="measure this machine's step costs (cached per machine)")
    profiler.add_arguments(profile_parser)
    profile_parser.set_defaults(run=profiler.main)
    stacks_parser = commands.add_parser("stacks", help="the controller names a stack is made of, and what each decides")
    from adactl import stacks

    stacks_parser.set_defaults(run=stacks.main)
    bench = commands.add_parser("bench", help="side-by-side benchmarks").add_subparsers(dest="bench", required=True)
    from adactl.bench import draft, inprocess, runtime, serve, spec, step, stream

    runtime_parser = bench.add_parser("runtime", help="the engine next to transformers' generate")
    runtime.add_arguments(runtime_parser)
    runtime_parser.set_defaults(run=runtime.main)
    step_parser = bench.add_parser("step", help="one engine step's cost next to a bare (CUDA-graph) forward")
    step.add_arguments(step_parser)
    step_parser.set_defaults(run=step.main)
    draft_parser = bench.add_parser("draft", help="the default draft: acceptance, cost and speedup at batch 1")
    draft.add_arguments(draft_parser)
    draft_parser.set_defaults(run=draft.main)
    spec_parser = bench.add_parser("spec", help="speculation controllers side by side (the main job)")
    spec.add_arguments(spec_parser)
    spec_parser.set_defaults(run=spec.main)
    stream_parser = bench.add_parser("stream", help="streaming schedulers (ProgressServe, ...) over a load sweep")
    stream.add_arguments(stream_parser)
    stream_parser.set_defaults(run=stream.main)
    serve_bench = bench.add_parser("serve", help="adactl serve under load, next to transformers serve")
    serve.add_arguments(serve_bench)
    serve_bench.set_defaults(run=serve.main)
    inprocess_parser = bench.add_parser("inprocess", help="a diagnostic: bench serve's workload in-process, no HTTP")
    inprocess.add_arguments(inprocess_parser)
    inprocess_parser.set_defaults(run=inprocess.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "no_cuda_graphs", False):
        from adactl.runtime.device import GRAPHS_ENV

        os.environ[GRAPHS_ENV] = "0"
    from adactl.estimators.step_cost import ProfileError
    from adactl.runtime.device import DeviceError

    try:
        args.run(args)
    except (DeviceError, ProfileError) as e:  # the user's to fix: say what, not a traceback
        print(f"adactl {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
