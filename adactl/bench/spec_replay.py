"""`adactl bench spec --replay`: the speculation bench on the profile replay, no model run.

The GPU regime on any machine (DESIGN.md section 9): every run of `bench spec` is served by
`ReplayEngine` (adactl.runtime.replay), whose steps take what the profile named by
`--profile` says (for a computed GPU profile, `h100-llama-3.1-8b` say, the physics it was
computed from: adactl.estimators.gpu_cost; for a measured one, its fitted model), with a
log-normal noise of `--replay-noise`, on a simulated clock. The controllers see the same
profile file a real run would load, refined online from the replayed steps as in the real
bench. Requests are the real bench's: held-out ShareGPT prompts (their token lengths), 32
new tokens each (`--max-new-tokens`; 128 unless given: a replayed token costs microseconds,
and a longer run averages more acceptance draws), batch 1 to 256, k 1 to 6.

Acceptance is one conditional probability per draft position for every row
(`--replay-alpha`; by default vLLM's published EAGLE acceptance with a computed GPU profile,
the shipped moving average with a measured one), so the replay serves the stacks whose
controllers read only what it produces (no-spec, fixed k, heuristic, bucket-ema, goodput).
Speculative Verification, the confidence stop, token trees and the oracles read per-request
draft and companion signals or the target's verdict, which the replay has only once it
draws requests from recorded acceptance traces (issue 32, item 3); they are refused with a
clear error until then. Both temperatures replay the same acceptance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from adactl.estimators import load_acceptance
from adactl.estimators.gpu_cost import GPU as GpuFigures
from adactl.estimators.gpu_cost import VLLM_ACCEPTANCE, EngineCosts, GpuStepCost, ModelShape
from adactl.estimators.step_cost import StepCostProfile
from adactl.runtime.models import SHIPPED_MODELS
from adactl.runtime.replay import ReplayEngine

REPLAYABLE = re.compile(r"no-spec|fixed-k\d+|heuristic|bucket-ema|goodput")


def replayable(stack: str) -> bool:
    """Whether every controller of `stack` reads only what the replay produces."""
    return all(REPLAYABLE.fullmatch(part) for part in stack.split(","))


def conditional(acceptance: tuple[float, ...], positions: int = 8) -> list[float]:
    """P(position i accepted) -> P(position i accepted | i - 1 accepted), as the replay draws it,
    for `positions` positions (past the published ones, the last conditional again)."""
    out, before = [], 1.0
    for a in acceptance:
        out.append(min(1.0, a / before) if before > 0 else 0.0)
        before = a
    return out + out[-1:] * (positions - len(out))


def truth(profile: StepCostProfile) -> Any:
    """What a replayed step costs: the physics of a computed profile, else the profile's fitted model."""
    m = profile.meta
    if m.get("computed"):
        return GpuStepCost(GpuFigures(**m["gpu"]), ModelShape(**m["model"]), EngineCosts(**m["engine"]), int(m["tp"]),
                           float(m["bytes_per_param"]))  # fmt: skip
    return profile.model(refine=False)


@dataclass
class ReplayEngines:
    """A fresh replay engine for each run (the same one with or without a companion: the
    replay's profile is the draft's)."""

    step_time: Any
    alpha: list[float]
    noise: float
    seed: int

    def __call__(self, companion: bool, batch: int) -> ReplayEngine:
        return ReplayEngine(self.step_time, self.alpha, max_batch_size=batch, noise=self.noise, seed=self.seed)


class ReplayCosts:
    """The controllers' step-cost model: the profile file, refined online from every replayed
    step of every run (one model, as one server's would be)."""

    def __init__(self, profile: StepCostProfile, refine: bool) -> None:
        self.model = profile.model(refine=refine)

    def __call__(self, companion: bool) -> Any:
        return self.model


def _prompt_lengths(args: Any) -> list[list[int]]:
    """The real bench's prompts (token ids: only their lengths matter here)."""
    n = max(args.batches)
    if args.tiny:
        return [[1] * (8 + 7 * i % 40) for i in range(n)]
    from adactl.runtime.models import load_model
    from adactl.workloads import chat_prompts, humaneval_prompts, read_sharegpt

    tokenizer = load_model(args.target).tokenizer
    if args.workload == "humaneval":
        return humaneval_prompts(tokenizer, n, args.max_prompt_tokens)
    return chat_prompts(tokenizer, n, args.max_prompt_tokens, read_sharegpt(), held_out=True)


def load_replay(args: Any) -> tuple[ReplayEngines, list[list[int]], Any, dict[str, Any], list[str], list[str]]:
    """engines, prompts, the controllers' context, meta, the stacks and oracles to run."""
    from adactl.bench.spec import RunContext
    from adactl.profiler import named_profile

    if args.slo or args.trees:
        raise SystemExit("adactl bench spec --replay: --slo and --trees need per-request acceptance traces, which "
                         "the replay does not have yet (issue 32, item 3)")  # fmt: skip
    if args.profile is None:
        raise SystemExit("adactl bench spec --replay needs --profile: a computed GPU profile by name "
                         "(h100-llama-3.1-8b, a100-llama-3.1-8b, h200-llama-3.1-8b, h100x4-llama-3.1-70b) or a file "
                         "from adactl profile --out")  # fmt: skip
    chosen = args.controllers or ["no-spec", *(f"fixed-k{k}" for k in args.ks), "heuristic", "bucket-ema", "goodput"]
    refused = [s for s in chosen if not replayable(s)]
    if refused:
        raise SystemExit(f"adactl bench spec --replay cannot run {', '.join(refused)}: they read per-request draft "
                         "or companion signals the replay does not produce yet (issue 32, item 3); it runs stacks of "
                         "no-spec, fixed-k{K}, heuristic, bucket-ema and goodput")  # fmt: skip
    profile = StepCostProfile.load(named_profile(args.profile))
    shipped = load_acceptance(SHIPPED_MODELS / "estimators" / "moving_average.json")
    if args.replay_alpha is not None:
        alpha = list(args.replay_alpha)
        if not alpha or any(not 0 <= a <= 1 for a in alpha):
            raise SystemExit(f"adactl bench spec --replay-alpha: probabilities in [0, 1], got {alpha}")
    elif profile.meta.get("computed"):
        alpha = conditional(VLLM_ACCEPTANCE)
    else:
        alpha = [float(a) for a in shipped.mean[:8]]
    engines = ReplayEngines(truth(profile), alpha, args.replay_noise, args.seed)

    def acceptance(name: str) -> Any:
        return load_acceptance(SHIPPED_MODELS / "estimators" / f"{name}.json")

    ctx = RunContext(acceptance, ReplayCosts(profile, args.refine), args.tree_width)
    where = profile.fingerprint.machine_label
    meta = {"target": profile.fingerprint.target, "workload": args.workload, "profile": str(args.profile),
            "replay": {"alpha": alpha, "noise": args.replay_noise, "truth": type(engines.step_time).__name__},
            "machine": {"label": f"replay of {where}", "replayed": where}, "refine": args.refine}  # fmt: skip
    return engines, _prompt_lengths(args), ctx, meta, chosen, []
