"""The `adactl` command line: `adactl serve`, `adactl profile`, `adactl export`, `adactl stacks` and
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
    from adactl import export

    export_parser = commands.add_parser("export", help="the machine's speculation schedule for vLLM or SGLang")
    export.add_arguments(export_parser)
    export_parser.set_defaults(run=export.main)
    stacks_parser = commands.add_parser("stacks", help="the controller names a stack is made of, and what each decides")
    from adactl import stacks

    stacks_parser.set_defaults(run=stacks.main)
    bench = commands.add_parser("bench", help="side-by-side benchmarks").add_subparsers(dest="bench", required=True)
    from adactl.bench import draft, inprocess, runtime, serve, spec, step, stream

    benches = [
        (runtime, "runtime", "the engine next to transformers' generate"),
        (step, "step", "one engine step's cost next to a bare (CUDA-graph) forward"),
        (draft, "draft", "the default draft: acceptance, cost and speedup at batch 1"),
        (spec, "spec", "speculation controllers side by side (the main job)"),
        (stream, "stream", "streaming schedulers (ProgressServe, ...) over a load sweep"),
        (serve, "serve", "adactl serve under load, next to transformers serve"),
        (inprocess, "inprocess", "a diagnostic: bench serve's workload in-process, no HTTP"),
    ]
    for module, name, summary in benches:
        sub = bench.add_parser(name, help=summary)
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "no_cuda_graphs", False):
        from adactl.runtime.device import GRAPHS_ENV

        os.environ[GRAPHS_ENV] = "0"
    from adactl.estimators.step_cost import ProfileError
    from adactl.export import ExportError
    from adactl.runtime.device import DeviceError
    from adactl.runtime.traces import TraceError

    try:
        args.run(args)
    except (DeviceError, ProfileError, ExportError, TraceError) as e:  # the user's to fix: say what, not a traceback
        print(f"adactl {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
