"""Controller stacks by name: what `adactl serve --controllers` and `adactl bench serve` take.

A stack is a comma-separated list, schedule controllers in order, then at most one verify
controller: `fcfs,goodput` runs FCFS admission, then the goodput-optimal draft length.

- admission and scheduling: `fcfs`, `fcfs-seqs{N}` (vLLM's max_num_seqs = N), `edf`, `andes`,
  `progressserve`, `ttft-budget` (the TTFT-bounded prefill budget);
- speculation: `no-spec`, `fixed-k{K}`, `goodput`, `slo` (AdaServe's per-request draft
  lengths, SLO first);
- verification: `sv` (Speculative Verification; loads the companion), `adaserve`.

A stack that never speculates (no `fixed-k`, `goodput`, `slo`, `sv` or `adaserve`) runs
without a draft model, so prompts are not prefilled twice. `DEFAULT_STACK` is the stack
`adactl bench serve` measured best on the default models.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adactl.controllers import (
    FCFS,
    AdaServe,
    AndesPriority,
    DeadlineFirst,
    FixedDraftLength,
    GoodputLength,
    NoSpeculation,
    ProgressServe,
    SLODraftLength,
    SpeculativeVerification,
    TTFTPrefillBudget,
)

DEFAULT_STACK = "andes"


@dataclass
class StackContext:
    """What controllers are built from: the step-time model and acceptance estimators."""

    step_time: Any
    acceptance: Callable[[str], Any]  # estimator name ("moving_average", "companion") -> a fresh one
    prefill_budget: int = 512
    max_running: int | None = 32


@dataclass
class Stack:
    schedule: list[Any]
    verify: Any = None
    needs_companion: bool = False


def _schedule(name: str, ctx: StackContext) -> Any | None:
    budget = ctx.prefill_budget
    if name == "fcfs":
        return FCFS(None, budget)
    if m := re.fullmatch(r"fcfs-seqs(\d+)", name):
        return FCFS(int(m.group(1)), budget)
    if name == "edf":
        return DeadlineFirst(ctx.max_running, None, budget)
    if name == "andes":
        return AndesPriority(ctx.max_running, None, budget)
    if name == "progressserve":
        return ProgressServe(ctx.step_time, prefill_budget=budget)
    if name == "ttft-budget":
        return TTFTPrefillBudget(ctx.step_time, budget)
    if name == "no-spec":
        return NoSpeculation()
    if m := re.fullmatch(r"fixed-k(\d+)", name):
        return FixedDraftLength(int(m.group(1)))
    if name == "goodput":
        return GoodputLength(ctx.step_time, ctx.acceptance("moving_average"))
    if name == "slo":
        return SLODraftLength(ctx.step_time, ctx.acceptance("moving_average"))
    return None


def _verify(name: str, ctx: StackContext) -> Any | None:
    if name == "sv":
        return SpeculativeVerification(ctx.acceptance("companion"), ctx.step_time)
    if name == "adaserve":
        return AdaServe(ctx.acceptance("companion"), ctx.step_time)
    return None


NAMES = "fcfs, fcfs-seqs{N}, edf, andes, progressserve, ttft-budget, no-spec, fixed-k{K}, goodput, slo; sv, adaserve"


def drafts(spec: str) -> bool:
    """Whether the stack `spec` ever speculates (else the server runs without a draft model)."""
    names = [n.strip() for n in spec.split(",")]
    return any(n in ("goodput", "slo", "sv", "adaserve") or re.fullmatch(r"fixed-k[1-9]\d*", n) for n in names)


def costs_steps(spec: str) -> bool:
    """Whether any controller of `spec` predicts step costs (else no profile is needed)."""
    names = [n.strip() for n in spec.split(",")]
    return any(n in ("progressserve", "ttft-budget", "goodput", "slo", "sv", "adaserve") for n in names)


def build_stack(spec: str, ctx: StackContext) -> Stack:
    """The controllers `spec` names, fresh. Raises ValueError naming what is unknown or misplaced."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"a controller stack names at least one controller ({NAMES})")
    stack = Stack([])
    for i, name in enumerate(names):
        verify = _verify(name, ctx)
        if verify is not None:
            if i != len(names) - 1:
                raise ValueError(f"{name!r} is a verify controller: it goes last in the stack {spec!r}")
            stack.verify, stack.needs_companion = verify, True
            continue
        controller = _schedule(name, ctx)
        if controller is None:
            raise ValueError(f"unknown controller {name!r} in {spec!r}; known: {NAMES}")
        stack.schedule.append(controller)
    return stack
