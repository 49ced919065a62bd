"""Run settings as frozen dataclasses, as cleanrl's `Args`: one class per command, a help text
per field, the command line made from the class and parsed into it. Helpers take the settings
(or the fields they need), never an argparse namespace.

    @dataclass(frozen=True)
    class StreamSettings(DeviceSettings):
        loads: list[float] = setting([0.5, 1.0], "requests/s, comma-separated", parse=floats)

    add_arguments(parser, StreamSettings)         # --loads, --device, --dtype, --no-cuda-graphs
    settings = from_args(StreamSettings, parser.parse_args())

Flags: a field `x_y` is `--x-y`; a bool that defaults to False is a switch (`--x-y`), one
that defaults to True is turned off by `--no-x-y`; other fields parse their text with `parse`
(default: the default's type) and may name `choices`.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")

DTYPES = ["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]


def setting(default: Any, help: str, parse: Callable[[str], Any] | None = None,
            choices: list[Any] | None = None) -> Any:  # fmt: skip
    """A settings field: its default, its help text, how its text parses, its choices."""
    meta = {"help": help, "parse": parse, "choices": choices}
    if getattr(default, "__hash__", None) is None:  # a list, a dict, a mutable dataclass: a fresh copy each time
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the settings class `cls` (but those in `skip`: a subcommand's
    name, say, that the parser fills in another way)."""
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc,operator]
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            if default:
                parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=meta.get("help"))
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=meta.get("help"))
            continue
        parse = meta.get("parse") or (type(default) if default is not None else str)
        parser.add_argument(flag, dest=f.name, type=parse, default=default, choices=meta.get("choices"),
                            help=meta.get("help"))  # fmt: skip


def parse(cls: type[T], argv: list[str] | None = None) -> T:
    """The settings of a command line (`argv`, else sys.argv) for the class `cls` alone."""
    parser = argparse.ArgumentParser(description=cls.__doc__)
    add_arguments(parser, cls)
    return from_args(cls, parser.parse_args(argv))


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The settings a parsed command line holds (fields it lacks keep their defaults)."""
    given = vars(args)
    names = [f.name for f in fields(cls) if f.name in given]  # type: ignore[arg-type]
    return cls(**{name: given[name] for name in names})


@dataclass(frozen=True)
class DeviceSettings:
    """Where models run: the same flags on every command."""

    device: str = setting("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    dtype: str = setting("auto", "model weights and activations: auto is bfloat16 on CUDA, float32 elsewhere",
                         choices=DTYPES)  # fmt: skip
    no_cuda_graphs: bool = setting(
        False, "all forwards eager on CUDA (sets ADACTL_CUDA_GRAPHS=0; graphs are on by default)"
    )
    allow_tf32: bool = setting(
        False, "float32 matrix products in TF32 on CUDA (faster, not bit-equal to float32; sets ADACTL_TF32=1)"
    )


def device_environment(args: argparse.Namespace) -> None:
    """What `--no-cuda-graphs` and `--allow-tf32` ask, for every engine and model the process
    makes (`adactl.runtime.device` reads the variables; imported here, after the command line
    parsed, so that this module stays free of torch)."""
    from adactl.runtime.device import GRAPHS_ENV, TF32_ENV

    if getattr(args, "no_cuda_graphs", False):
        os.environ[GRAPHS_ENV] = "0"
    if getattr(args, "allow_tf32", False):
        os.environ[TF32_ENV] = "1"


@dataclass(frozen=True)
class ProfileSettings:
    """Step costs: the same flags on every command whose controllers predict them."""

    profile: str | None = setting(
        None,
        "a step-cost profile file (adactl profile --out), or 'shipped' (the CPU "
        "prior shipped with adactl); default: this machine's, measured on first use, cached",
    )
    refine: bool = setting(True, "keep the profile's costs as they are (no online refinement from served steps)")


@dataclass(frozen=True)
class WorkloadSettings:
    """An open-loop workload (adactl.workloads): held-out ShareGPT requests arriving as a Poisson
    process (Gamma gaps with burstiness < 1), each read by a consumer."""

    requests: int = setting(40, "requests per run")
    burstiness: float = setting(1.0, "Gamma shape of arrival gaps (1 = Poisson)")
    consumers: str = setting("mixed", "mixed: token, speech, word and sentence readers; tokens: token and speech "
                             "readers", choices=["mixed", "tokens"])  # fmt: skip
    ttft: float = setting(1.0, "a reader's first unit is due this long after arrival (s)")
    max_prompt_tokens: int = setting(128, "prompts are clipped to this")
    seed: int = setting(0, "seed of prompts, arrivals, readers and sampling")


@dataclass(frozen=True)
class ServerLimits:
    """What `adactl serve` admits at once."""

    max_batch: int = setting(64, "requests running or prefilling at once, at most")
    max_queue: int = setting(64, "requests waiting for a first token before 429s")


@dataclass(frozen=True)
class RunSettings:
    """Where a bench writes, and its smoke-run switch."""

    out: str = setting("bench_results", "directory for the JSON records and the PNG plot")
    tiny: bool = setting(False, "tiny random models (a smoke run in seconds)")


@dataclass(frozen=True)
class PairSettings:
    """The models: a target and the draft that speculates for it."""

    target: str = setting("smollm2", "target model spec (default: the embedded SmolLM2-135M-Instruct)")
    draft: str = setting("draft", "draft: draft (shipped, v3), draft-v1, a saved feature draft or a model spec "
                         "sharing the target's tokenizer")  # fmt: skip
