"""The `adactl` command line: `adactl serve`, `adactl profile`, `adactl export`, `adactl stacks` and
`adactl bench spec | stream | serve | inprocess | runtime | step | draft`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

COMMANDS = {  # name: (module, help); a module gives add_arguments(parser) and main(args)
    "serve": ("adactl.server.main", "an OpenAI-compatible streaming server with the controllers"),
    "profile": ("adactl.profiler", "measure this machine's step costs (cached per machine)"),
    "export": ("adactl.export", "the machine's speculation schedule for vLLM or SGLang"),
    "stacks": ("adactl.stacks", "the controller names a stack is made of, and what each decides"),
}
BENCHES = {
    "runtime": ("adactl.bench.runtime", "the engine next to transformers' generate"),
    "step": ("adactl.bench.step", "one engine step's cost next to a bare (CUDA-graph) forward"),
    "draft": ("adactl.bench.draft", "the default draft: acceptance, cost and speedup at batch 1"),
    "spec": ("adactl.bench.spec", "speculation controllers side by side (the main job)"),
    "stream": ("adactl.bench.stream", "streaming schedulers (ProgressServe, ...) over a load sweep"),
    "serve": ("adactl.bench.serve", "adactl serve under load, next to transformers serve"),
    "inprocess": ("adactl.bench.inprocess", "a diagnostic: bench serve's workload in-process, no HTTP"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line. Only the command `argv` names (all of them when None) imports its
    module and adds its arguments: `adactl bench spec --replay` does not load the server."""
    words = [a for a in (argv or []) if not a.startswith("-")][:2]
    every = argv is None
    parser = argparse.ArgumentParser(prog="adactl", description="Online control of LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(group: Any, name: str, module: str, summary: str, wanted: bool) -> None:
        sub = group.add_parser(name, help=summary)
        if wanted or every:
            mod = importlib.import_module(module)
            if hasattr(mod, "add_arguments"):
                mod.add_arguments(sub)
            sub.set_defaults(run=mod.main)

    for name, (module, summary) in COMMANDS.items():
        add(commands, name, module, summary, words[:1] == [name])
    bench = commands.add_parser("bench", help="side-by-side benchmarks").add_subparsers(dest="bench", required=True)
    for name, (module, summary) in BENCHES.items():
        add(bench, name, module, summary, words == ["bench", name])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    from adactl.settings import device_environment

    device_environment(args)
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
