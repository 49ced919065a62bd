"""The `adactl` command line: `adactl bench runtime` (more subcommands land with their issues)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adactl", description="Online control of LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="side-by-side benchmarks").add_subparsers(dest="bench", required=True)
    from adactl.bench import runtime

    runtime_parser = bench.add_parser("runtime", help="the engine next to transformers' generate")
    runtime.add_arguments(runtime_parser)
    runtime_parser.set_defaults(run=runtime.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
