"""Controller stacks by name: the one vocabulary of `adactl serve`, every bench, the
environments' baselines and `adactl stacks`.

A stack is a comma-separated list of controller names: schedule controllers in order, then at
most one verify controller. `fcfs,goodput` runs FCFS admission, then the goodput-optimal draft
length; `fixed-k4,sv` drafts 4 tokens and lets Speculative Verification choose how many of
them to verify. Each name is one controller and means the same in every command; a variant
has its own name (`slo-tree` is `slo` over token trees, `adaserve-conf` is `adaserve` reading
the draft's confidence instead of the companion). A bench labels each run with its stack.

    build_stack("progressserve,ttft-budget", StackContext(step_time, load_acceptance))

`adactl stacks` prints `REGISTRY`: each name, its role, the decisions it makes and what it is.
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
    BucketEMA,
    BufferOffload,
    ConfidenceStop,
    DeadlineFirst,
    FixedDraftLength,
    GlobalTreeAllocation,
    GoodputLength,
    GoodputTree,
    HeuristicSchedule,
    LearnedController,
    NoSpeculation,
    ProgressServe,
    RequestGoodput,
    RequestGoodputTree,
    SLODraftLength,
    SpeculativeVerification,
    TreeDraft,
    TTFTPrefillBudget,
    VLLMv1,
)
from adactl.estimators.request_acceptance import RequestAcceptance, width_sibling_prior
from adactl.estimators.step_time import StepTimePredictor
from adactl.interface import Estimator
from adactl.runtime.types import TreeSpec

DEFAULT_STACK = "andes"
ACCEPTANCE = ("moving_average", "companion", "confidence")  # the estimators a stack may ask for


def no_acceptance(name: str) -> Estimator:
    raise ValueError(f"this stack reads acceptance estimates ({name}): its StackContext needs `acceptance`")


def untrained_acceptance(name: str) -> Estimator:
    """A fresh, unfitted estimator of each kind a stack asks for (tiny models, tests)."""
    from adactl.estimators import CompanionSignal, DraftConfidence, MovingAverage

    kinds: dict[str, Callable[[], Estimator]] = {
        "moving_average": MovingAverage, "companion": CompanionSignal, "confidence": DraftConfidence
    }  # fmt: skip
    if name not in kinds:
        raise ValueError(f"no acceptance estimator {name!r}; known: {ACCEPTANCE}")
    return kinds[name]()


@dataclass(frozen=True)
class StackContext:
    """What controllers are built from.

    step_time: the machine's step-cost model (None only for stacks that never predict a cost:
    see `costs_steps`); acceptance: estimator name (one of `ACCEPTANCE`) -> a fresh estimator;
    prefill_budget: prompt tokens per step of the static budgets; max_running: the in-flight
    cap of `edf` and `andes`; tree_width: alternatives per level of `goodput-tree`, `goodput-req-tree`, `slo-tree`;
    tree_extra_nodes: nodes `goodput-tree` and `goodput-req-tree` keep beyond tree_width a level (`tree_nodes_kept`);
    seed: of the controllers' own draws (the probes of `goodput`, `goodput-req`, `slo`). A server
    builds its stack once and its draws go on from step to step; a bench that builds a stack
    per run gives each run a seed of its own, or every run draws the same probes at the same
    steps (`adactl bench spec` with seed 0 in every run: `goodput`'s twelfth decode step drew
    0.0027 in every run, and probed a whole-batch k = 1 step wherever the probe's weight was
    above 0.09, 1.7% of a 32-step run at batch 32-64 where plain decoding was the best; one
    such step in 12 of the 44 fastest rounds `goodput` ran there in `make bench` runs 18-29)."""

    step_time: StepTimePredictor | None
    acceptance: Callable[[str], Estimator] = no_acceptance
    prefill_budget: int = 512
    max_running: int | None = 32
    tree_width: int = 2
    tree_extra_nodes: int = 0
    seed: int = 0

    def cost(self) -> StepTimePredictor:
        if self.step_time is None:
            raise ValueError("this stack predicts step costs: its StackContext needs a step_time model")
        return self.step_time


@dataclass(frozen=True)
class Entry:
    """One controller name. `pattern` (a regex over the whole name) binds the numbers a name
    carries; `build(ctx, numbers)` makes a fresh controller."""

    shown: str
    pattern: str
    role: str  # "schedule" or "verify"
    decisions: str
    summary: str
    build: Callable[[StackContext, tuple[int, ...]], Any]
    speculates: bool = False
    costs_steps: bool = False
    companion: bool = False


def _learned(env: str, ctx: StackContext) -> LearnedController:
    from adactl.runtime.models import SHIPPED_MODELS

    return LearnedController(SHIPPED_MODELS / "policies" / f"{env}.safetensors", step_time=ctx.cost())


def _tree(n: tuple[int, ...]) -> TreeDraft:
    return TreeDraft(TreeSpec(*n))


REGISTRY: tuple[Entry, ...] = (
    # admission and scheduling
    Entry("fcfs", r"fcfs", "schedule", "admission, prefill budget",
          "vLLM's scheduler: first come first served, decode first, a static chunked-prefill budget",
          lambda c, n: FCFS(None, c.prefill_budget)),
    Entry("fcfs-seqs{N}", r"fcfs-seqs(\d+)", "schedule", "admission, prefill budget",
          "fcfs with vLLM's max_num_seqs = N requests in flight",
          lambda c, n: FCFS(n[0], c.prefill_budget)),
    Entry("edf", r"edf", "schedule", "admission, run order",
          "earliest deadline (least slack) first, at most max_running requests per step",
          lambda c, n: DeadlineFirst(c.max_running, None, c.prefill_budget)),
    Entry("andes", r"andes", "schedule", "admission, run order",
          "Andes-style priority: the largest delivery lag first, at most max_running per step",
          lambda c, n: AndesPriority(c.max_running, None, c.prefill_budget)),
    Entry("progressserve", r"progressserve", "schedule", "admission, run or defer",
          "ProgressServe: run what is at risk, defer safe buffers, admit only what stays safe",
          lambda c, n: ProgressServe(c.cost(), prefill_budget=c.prefill_budget), costs_steps=True),
    Entry("tokenflow", r"tokenflow", "schedule", "admission, offload and restore",
          "TokenFlow-like: FCFS admission made room for by moving the largest buffers off the device",
          lambda c, n: BufferOffload(c.cost(), prefill_budget=c.prefill_budget), costs_steps=True),
    Entry("vllm-v1", r"vllm-v1", "schedule", "admission, preemption, token budget",
          "vLLM v1's scheduler: one token budget for decode and prefill, whole-sequence admission with "
          "head-of-line blocking, last-admitted recompute preemption (H100 defaults: 1024 seqs, 8192 tokens)",
          lambda c, n: VLLMv1()),
    Entry("vllm-v1-seqs{N}-tokens{T}", r"vllm-v1-seqs(\d+)-tokens(\d+)", "schedule",
          "admission, preemption, token budget", "vllm-v1 with max_num_seqs = N and max_num_batched_tokens = T",
          lambda c, n: VLLMv1(n[0], n[1])),
    Entry("vllm-v1-offload", r"vllm-v1-offload", "schedule", "admission, preemption, token budget",
          "vllm-v1 preempting by swap to host memory (v0's swap space) instead of recompute",
          lambda c, n: VLLMv1(offload=True)),
    Entry("vllm-v1-priority", r"vllm-v1-priority", "schedule", "admission, preemption, token budget",
          "vllm-v1 with its priority policy: queue and victims by (SLO.priority, arrival), lower first",
          lambda c, n: VLLMv1(priority=True)),
    Entry("ttft-budget", r"ttft-budget", "schedule", "prefill budget",
          "the smallest chunked-prefill budget that keeps every waiting request's TTFT feasible",
          lambda c, n: TTFTPrefillBudget(c.cost(), c.prefill_budget), costs_steps=True),
    # draft length (chains)
    Entry("no-spec", r"no-spec", "schedule", "draft length",
          "plain decoding: no draft tokens",
          lambda c, n: NoSpeculation()),
    Entry("fixed-k{K}", r"fixed-k(\d+)", "schedule", "draft length",
          "standard speculative decoding: K draft tokens per row, all verified",
          lambda c, n: FixedDraftLength(n[0]), speculates=True),
    Entry("heuristic", r"heuristic", "schedule", "draft length",
          "transformers' assisted-generation schedule: +2 after a fully accepted draft, else -1",
          lambda c, n: HeuristicSchedule(initial=4), speculates=True),
    Entry("bucket-ema", r"bucket-ema", "schedule", "draft length",
          "SGLang-style: the accepted-length average per batch-size bucket",
          lambda c, n: BucketEMA(), speculates=True),
    Entry("goodput", r"goodput", "schedule", "draft length",
          "the draft length maximising predicted tokens per predicted second",
          lambda c, n: GoodputLength(c.cost(), c.acceptance("moving_average"), seed=c.seed), speculates=True,
          costs_steps=True),
    Entry("goodput-req", r"goodput-req", "schedule", "draft length per request",
          "per-request goodput: each request's own acceptance, the batch's draft tokens where they pay most",
          lambda c, n: RequestGoodput(c.cost(), RequestAcceptance(c.acceptance("moving_average")), seed=c.seed),
          speculates=True, costs_steps=True),
    Entry("slo", r"slo", "schedule", "draft length per request",
          "AdaServe's draft lengths: each request on its TPOT SLO first, then throughput",
          lambda c, n: SLODraftLength(c.cost(), c.acceptance("moving_average"), seed=c.seed), speculates=True,
          costs_steps=True),
    # token trees
    Entry("tree-d{D}w{W}n{N}", r"tree-d(\d+)w(\d+)n(\d+)", "schedule", "token tree",
          "a fixed token tree: depth D, W alternatives per level, N nodes kept",
          lambda c, n: _tree(n), speculates=True),
    Entry("goodput-tree", r"goodput-tree", "schedule", "token tree",
          "tree depth from the goodput length (no draft when it is 0), tree_width alternatives per level",
          lambda c, n: GoodputTree(c.cost(), c.acceptance("moving_average"), c.tree_width,
                                   extra_nodes=c.tree_extra_nodes),
          speculates=True, costs_steps=True),
    Entry("goodput-req-tree", r"goodput-req-tree", "schedule", "token tree per request",
          "per-request goodput over token trees: each request's own tree depth (or chain length) from its own "
          "acceptance, tree_width alternatives per level, the batch's budget where it pays most",
          lambda c, n: RequestGoodputTree(c.cost(), RequestAcceptance(c.acceptance("moving_average"),
                                                                      sibling_prior=width_sibling_prior(c.tree_width)),
                                          c.tree_width, extra_nodes=c.tree_extra_nodes, seed=c.seed),
          speculates=True, costs_steps=True),
    Entry("slo-tree", r"slo-tree", "schedule", "token tree per request",
          "slo over token trees of tree_width alternatives per level",
          lambda c, n: SLODraftLength(c.cost(), c.acceptance("moving_average"), tree_width=c.tree_width, seed=c.seed),
          speculates=True, costs_steps=True),
    # learned (train/ppo.py; the shipped policies in models/policies/)
    Entry("learned-stream", r"learned-stream", "schedule", "admission, run or defer, prefill budget",
          "the shipped Streaming-v0 PPO policy setting ProgressServe's knobs each step, then ttft-budget",
          lambda c, n: _learned("Streaming-v0", c), costs_steps=True),
    Entry("learned-spec", r"learned-spec", "schedule", "draft length",
          "the shipped SpecDecode-v0 PPO policy choosing the batch's draft length each step",
          lambda c, n: _learned("SpecDecode-v0", c), speculates=True, costs_steps=True),
    Entry("learned-spec-h100", r"learned-spec-h100", "schedule", "draft length per request",
          "the shipped per-row SpecDecode-v0 PPO policy trained in the replay of the computed H100 x Llama-3.1-8B "
          "on the recorded traces: a cap and a threshold on each request's own acceptance estimate",
          lambda c, n: _learned("SpecDecode-v0-h100", c), speculates=True, costs_steps=True),
    # verification
    Entry("confidence-stop", r"confidence-stop", "verify", "verify length",
          "transformers' stop: verify up to the first draft token of confidence < 0.4",
          lambda c, n: ConfidenceStop(0.4), speculates=True),
    Entry("sv", r"sv", "verify", "verify length",
          "Speculative Verification: batch-aware verify lengths from the companion's acceptance signal",
          lambda c, n: SpeculativeVerification(c.acceptance("companion"), c.cost()),
          speculates=True, costs_steps=True, companion=True),
    Entry("adaserve", r"adaserve", "verify", "verify length per request",
          "AdaServe's verify lengths: each request on its TPOT SLO first (companion signal)",
          lambda c, n: AdaServe(c.acceptance("companion"), c.cost()),
          speculates=True, costs_steps=True, companion=True),
    Entry("adaserve-conf", r"adaserve-conf", "verify", "verify length per request",
          "adaserve reading the calibrated draft confidence (trees have no companion signal)",
          lambda c, n: AdaServe(c.acceptance("confidence"), c.cost()), speculates=True, costs_steps=True),
    Entry("tree-alloc", r"tree-alloc", "verify", "verify budget over tree nodes",
          "the batch's verify budget spent on the tree nodes of highest survival (draft confidence)",
          lambda c, n: GlobalTreeAllocation(c.acceptance("confidence"), c.cost()),
          speculates=True, costs_steps=True),
)  # fmt: skip

NAMES = ", ".join(e.shown for e in REGISTRY)
KINDS = {  # controllers that make the same decision; a stack has at most one of each kind
    "admission": {"fcfs", "fcfs-seqs{N}", "edf", "andes", "progressserve", "learned-stream", "vllm-v1", "tokenflow",
                  "vllm-v1-seqs{N}-tokens{T}", "vllm-v1-offload", "vllm-v1-priority"},
    "draft-length": {"no-spec", "fixed-k{K}", "heuristic", "bucket-ema", "goodput", "slo", "tree-d{D}w{W}n{N}",
                     "goodput-tree", "slo-tree", "learned-spec", "goodput-req", "learned-spec-h100",
                     "goodput-req-tree"},
}  # fmt: skip


@dataclass
class Stack:
    schedule: list[Any]
    verify: Any = None
    needs_companion: bool = False


def parse(spec: str) -> list[tuple[Entry, tuple[int, ...]]]:
    """The entries `spec` names, in order. Raises ValueError naming what is unknown or misplaced."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"a controller stack names at least one controller ({NAMES})")
    found = []
    for i, name in enumerate(names):
        for entry in REGISTRY:
            if m := re.fullmatch(entry.pattern, name):
                break
        else:
            raise ValueError(f"unknown controller {name!r} in {spec!r}; known: {NAMES}")
        if entry.role == "verify" and i != len(names) - 1:
            raise ValueError(f"{name!r} is a verify controller: it goes last in the stack {spec!r}")
        found.append((entry, tuple(int(g) for g in m.groups())))
    for kind, members in KINDS.items():  # one controller per decision: a second would overrule the first
        named = [names[i] for i, (entry, _) in enumerate(found) if entry.shown in members]
        if len(named) > 1:
            raise ValueError(f"{spec!r} names {len(named)} {kind} controllers ({', '.join(named)}): a stack has one; "
                             "separate stacks with ';'")  # fmt: skip
    return found


def stack_list(text: str) -> list[str]:
    """A command line's stacks, `;`-separated: `"fcfs;fixed-k4,sv"` -> ["fcfs", "fixed-k4,sv"],
    each checked against the registry (an argparse type: a bad name is a usage error)."""
    import argparse

    names = [t.strip() for t in text.split(";") if t.strip()]
    try:
        for name in names:
            parse(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return names


def one_stack(text: str) -> str:
    """A command line's single stack, checked (an argparse type: a bad name is a usage error)."""
    import argparse

    stacks = stack_list(text)
    if len(stacks) != 1:
        raise argparse.ArgumentTypeError(f"one stack, got {text!r}")
    return stacks[0]


def is_fixed(stack: str) -> bool:
    """A constant draft length (0 included), all verified: what a tuned server would run."""
    return re.fullmatch(r"no-spec|fixed-k\d+", stack) is not None


def build_stack(spec: str, ctx: StackContext) -> Stack:
    """The controllers `spec` names, fresh."""
    stack = Stack([])
    for entry, numbers in parse(spec):
        controller = entry.build(ctx, numbers)
        if entry.role == "verify":
            stack.verify, stack.needs_companion = controller, entry.companion
        else:
            stack.schedule.append(controller)
    return stack


def drafts(spec: str) -> bool:
    """Whether the stack ever speculates (else it runs without a draft model: no second prefill)."""
    return any(entry.speculates and numbers != (0,) for entry, numbers in parse(spec))


def costs_steps(spec: str) -> bool:
    """Whether any controller of the stack predicts step costs (else no profile is needed)."""
    return any(entry.costs_steps for entry, _ in parse(spec))


def needs_companion(spec: str) -> bool:
    """Whether the stack verifies with the companion's signal (its engine loads the companion)."""
    return any(entry.companion for entry, _ in parse(spec))


def listing() -> str:
    """`adactl stacks`: every controller name, its role, its decisions and what it is."""
    width = max(len(e.shown) for e in REGISTRY)
    lines = ["A stack: schedule controllers, comma-separated, then at most one verify controller.", ""]
    for role in ("schedule", "verify"):
        lines.append(f"{role} controllers:")
        for e in (e for e in REGISTRY if e.role == role):
            lines.append(f"  {e.shown:<{width}}  {e.summary}")
            lines.append(f"  {'':<{width}}  decides: {e.decisions}")
        lines.append("")
    lines.append(f"default stack of adactl serve: {DEFAULT_STACK}")
    return "\n".join(lines)


def main(args: Any = None) -> None:
    """`adactl stacks`."""
    print(listing())
