"""`adactl bench spec --replay`: the speculation bench on the profile replay, no model run.

The GPU regime on any machine (DESIGN.md section 9): every run of `bench spec` is served by
`ReplayEngine` (adactl.runtime.replay), whose steps take what the profile named by
`--profile` says (for a computed GPU profile, `h100-llama-3.1-8b` say, the physics it was
computed from: adactl.estimators.gpu_cost; for a measured one, its fitted model), with a
log-normal noise of `--replay-noise`, on a simulated clock. The controllers see the same
profile file a real run would load, refined online from the replayed steps as in the real
bench. Batch 1 to 256, k 1 to 6, 128 new tokens unless given (a replayed token costs
microseconds, and a longer run averages more acceptance).

Acceptance, by default, is the default pair's per-request traces (adactl.runtime.traces,
`--replay-traces shipped`: the shipped recordings of `--workload`, greedy and at 0.7, each
replayed request following one recorded request, its prompt length, its acceptance at every
output position and the draft and companion signals there), so every chain controller runs,
Speculative Verification and the oracle included: greedy replay is exact for any draft length
and verified prefix. With `--trees`, the token-tree stacks and the tree oracle run too, on the
shipped tree traces of `--tree-width` (2 or 4, depth 6: every tree of that width up to depth 6
is replayed exactly for greedy rows, any node budget and verified prefix). `--slo` replays the mixed-SLO
workload (adactl.bench.slo) on the traces. With
`--replay-alpha` (or `--replay-traces none`), one conditional probability per draft position
for every request instead (none: vLLM's published EAGLE acceptance with a computed GPU
profile, the shipped moving average with a measured one), and only the stacks that read no
per-request signal run (no-spec, fixed k, heuristic, bucket-ema, goodput).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adactl.estimators import load_acceptance
from adactl.estimators.gpu_cost import VLLM_ACCEPTANCE, replay_truth
from adactl.estimators.step_cost import StepCostProfile
from adactl.runtime.models import SHIPPED_MODELS
from adactl.runtime.replay import ReplayEngine
from adactl.runtime.traces import AcceptanceTraces, shipped_traces

FLAT = re.compile(r"no-spec|fixed-k\d+|heuristic|bucket-ema|goodput")


def replayable(stack: str, traces: AcceptanceTraces | None) -> bool:
    """Whether every controller of `stack` reads only what the replay produces: with traces,
    any chain stack, and tree stacks where they carry tree traces; with a flat alpha, those
    that read no per-request signal."""
    if traces is None:
        return all(FLAT.fullmatch(part) for part in stack.split(","))
    return "tree" not in stack or traces.tree_width is not None


def conditional(acceptance: tuple[float, ...], positions: int = 8) -> list[float]:
    """P(position i accepted) -> P(position i accepted | i - 1 accepted), as the replay draws it,
    for `positions` positions (past the published ones, the last conditional again)."""
    out, before = [], 1.0
    for a in acceptance:
        out.append(min(1.0, a / before) if before > 0 else 0.0)
        before = a
    return out + out[-1:] * (positions - len(out))


truth = replay_truth  # what a replayed step costs (adactl.estimators.gpu_cost)


@dataclass
class ReplayEngines:
    """A fresh replay engine for each run (the same one with or without a companion: the
    replay's profile is the draft's; the traces carry the companion's signal)."""

    step_time: Any
    alpha: list[float]
    noise: float
    seed: int
    traces: AcceptanceTraces | None = None
    companion_step_time: Any = None  # runs with the companion, where they cost more (None: step_time)

    def __call__(self, companion: bool, batch: int) -> ReplayEngine:
        cost = self.companion_step_time if companion and self.companion_step_time is not None else self.step_time
        return ReplayEngine(cost, self.alpha, max_batch_size=batch, noise=self.noise, seed=self.seed,
                            traces=self.traces)  # fmt: skip


class ReplayCosts:
    """The controllers' step-cost model: the profile file (with the companion: its own, if
    given), refined online from every replayed step of every run (one model per engine kind,
    as one server's would be)."""

    def __init__(self, profile: StepCostProfile, refine: bool, companion: StepCostProfile | None = None) -> None:
        alone = profile.model(refine=refine)
        self.models = {False: alone, True: companion.model(refine=refine) if companion is not None else alone}

    def __call__(self, companion: bool) -> Any:
        return self.models[companion]


def _prompt_lengths(args: Any, traces: AcceptanceTraces | None) -> list[list[int]]:
    """The prompts (token ids: only their lengths matter here): the traces' recorded requests
    in turn (request i follows trace i of its kind), else the real bench's prompts."""
    from adactl.bench.spec import prompt_count

    n = prompt_count(args)
    if traces is not None:
        greedy = [t for t in traces.requests if t.greedy] or traces.requests
        return [[1] * greedy[i % len(greedy)].prompt_len for i in range(n)]
    if args.tiny:
        return [[1] * (8 + 7 * i % 40) for i in range(n)]
    from adactl.runtime.models import load_model
    from adactl.workloads import spec_prompts

    return spec_prompts(load_model(args.target).tokenizer, args.workload, n, args.max_prompt_tokens)


def load_traces(args: Any) -> AcceptanceTraces | None:
    """`--replay-traces`: shipped (the workload's greedy and 0.7 recordings, with their tree
    traces), none, or files ';'-separated (a tree trace file goes right after the chain file of
    the same requests, and is attached to it)."""
    if args.replay_alpha is not None or args.replay_traces in (None, "none"):
        return None
    if args.replay_traces == "shipped":
        return shipped_traces(args.workload, tree_width=args.tree_width)
    parts: list[AcceptanceTraces] = []
    for path in (Path(p) for p in args.replay_traces.split(";") if p):
        loaded = AcceptanceTraces.load(path)
        if loaded.tree is None:
            parts.append(loaded)
        elif not parts or parts[-1].tree_width is not None:
            raise SystemExit(f"adactl bench spec --replay-traces: the tree traces {path} follow no chain trace file "
                             "of the same requests (list the chain file first)")  # fmt: skip
        else:
            parts[-1] = parts[-1].with_trees(loaded)
    return AcceptanceTraces.mix(parts)


def load_replay(args: Any) -> tuple[ReplayEngines, list[list[int]], Any, dict[str, Any], list[str], list[str]]:
    """engines, prompts, the controllers' context, meta, the stacks and oracles to run."""
    from adactl.bench.spec import RunContext, stacks, tree_stacks
    from adactl.profiler import named_profile

    if args.slo and (args.replay_alpha is not None or args.replay_traces in (None, "none")):
        raise SystemExit("adactl bench spec --replay --slo needs per-request traces (AdaServe reads the companion "
                         "signal they carry): --replay-traces shipped or files")  # fmt: skip
    if args.profile is None:
        raise SystemExit("adactl bench spec --replay needs --profile: a computed GPU profile by name "
                         "(h100-llama-3.1-8b, a100-llama-3.1-8b, h200-llama-3.1-8b, h100x4-llama-3.1-70b) or a file "
                         "from adactl profile --out")  # fmt: skip
    if args.replay_alpha is not None and (not args.replay_alpha or any(not 0 <= a <= 1 for a in args.replay_alpha)):
        raise SystemExit(f"adactl bench spec --replay-alpha: probabilities in [0, 1], got {args.replay_alpha}")
    traces = load_traces(args)
    if args.trees and (traces is None or traces.tree_width is None):
        raise SystemExit(f"adactl bench spec --replay --trees needs tree traces of width {args.tree_width}: the "
                         "shipped ones (--replay-traces shipped; widths 2 and 4), or files recorded with python "
                         f"train/record_traces.py --tree-width {args.tree_width}")  # fmt: skip
    if args.trees and traces is not None and traces.tree_width not in (args.tree_width, None):
        raise SystemExit(f"adactl bench spec --replay --trees: the tree traces are width {traces.tree_width}, "
                         f"--tree-width is {args.tree_width}")  # fmt: skip
    flat = ["no-spec", *(f"fixed-k{k}" for k in args.ks), "heuristic", "bucket-ema", "goodput"]
    trees = tree_stacks(args.fixed_trees, args.tree) if args.trees else []
    chosen = args.controllers or ([*stacks(args.ks, args.sv_k), *trees] if traces is not None else flat)
    if args.slo:
        chosen = [*(args.slo_controllers or []), "slo,adaserve"]
    refused = [s for s in chosen if not replayable(s, traces)]
    if refused:
        why = ("the traces hold chains, not trees (record tree traces: python train/record_traces.py --tree-width 2)"
               if traces is not None else "they read per-request draft or companion signals a flat --replay-alpha "
               "does not produce (replay traces instead)")  # fmt: skip
        raise SystemExit(f"adactl bench spec --replay cannot run {', '.join(refused)}: {why}")
    profile = StepCostProfile.load(named_profile(args.profile))
    if args.replay_alpha is not None:
        alpha = list(args.replay_alpha)
    elif traces is not None:
        alpha = traces.mean_acceptance()
    elif profile.meta.get("computed"):
        alpha = conditional(VLLM_ACCEPTANCE)
    else:
        alpha = [float(a) for a in load_acceptance(SHIPPED_MODELS / "estimators" / "moving_average.json").mean[:8]]
    engines = ReplayEngines(truth(profile), alpha, args.replay_noise, args.seed, traces)

    def acceptance(name: str) -> Any:
        return load_acceptance(SHIPPED_MODELS / "estimators" / f"{name}.json")

    ctx = RunContext(acceptance, ReplayCosts(profile, args.refine), args.tree_width, args.tree_extra_nodes)
    where = profile.fingerprint.machine_label
    acceptance_from = f"alpha {alpha}"
    if traces is not None:
        draft = traces.meta.get("models", {}).get("draft")
        acceptance_from = f"traces: {traces.meta.get('workload')} ({len(traces)} requests, {draft})"
    meta = {"target": profile.fingerprint.target, "workload": args.workload, "profile": str(args.profile),
            "replay": {"acceptance": acceptance_from, "noise": args.replay_noise,
                       "truth": type(engines.step_time).__name__},
            "machine": {"label": f"replay of {where}", "replayed": where}, "refine": args.refine}  # fmt: skip
    oracles = (["oracle", "tree-oracle"] if args.trees else ["oracle"]) if traces is not None else []
    if traces is not None:  # the replay knows each request's acceptance, and each step's verdict, before drafting
        oracles += ["request-oracle", "lookahead-oracle"]
    return engines, _prompt_lengths(args, traces), ctx, meta, chosen, oracles


# ------------------------------------------------------------------ --validate
def _over_rounds(record: dict[str, Any]) -> float:
    """A configuration's tokens/s: the geometric mean of its rounds (its record's is the fastest)."""
    rounds = record.get("rounds") or [record["tokens_per_s"]]
    return float(np.exp(np.mean(np.log(rounds))))


def _machine_profile(pair: Any, file: str | None) -> StepCostProfile:
    """The profile a real run on `pair` used: the file named, else this machine's cached one."""
    from adactl.profiler import cached_path, fingerprint, named_profile, shipped_profile

    if file == "shipped":
        return StepCostProfile.load(shipped_profile(pair.specs))
    if file:
        return StepCostProfile.load(named_profile(file))
    return StepCostProfile.load(cached_path(fingerprint(pair.model_ids, pair.device, pair.dtype)))


def validate(args: Any, real: list[dict[str, Any]], ctx: Any, prompts: list[list[int]], chosen: list[str],
             meta: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """`bench spec --validate`: the same sweep on the replay (this machine's profiles, frozen,
    as the truth; the shipped traces of this draft as the acceptance; the same requests), and
    per configuration the replay's error in tokens/s (geometric means over rounds) and in mean
    draft length; the profile's error on the engine's own steps (`step_error`); and what the
    machine allows: the engine's spread between rounds of one configuration, and the tokens/s
    error once the replay's clock is divided by the profile's level on the sweep's steps (one
    factor for the whole sweep: the machine's speed then against when it was profiled; exact
    for fixed-k runs, whose steps do not depend on time)."""
    from adactl.bench.common import format_table, logged_steps, step_error, write_json
    from adactl.bench.spec import RunContext, _settings, add_ratios, sweep
    from adactl.stacks import needs_companion

    alone, both = ctx.costs.pairs[False], ctx.costs.pairs[True]
    draft = alone.model_ids["draft"]
    traces = shipped_traces(args.workload, draft=draft, tree_width=args.tree_width)
    profiles = {c: _machine_profile(p, ctx.costs.files[c]) for c, p in ((False, alone), (True, both))}
    engines = ReplayEngines(truth(profiles[False]), traces.mean_acceptance(), args.replay_noise, args.seed, traces,
                            companion_step_time=truth(profiles[True]))  # fmt: skip
    here = RunContext(ctx.acceptance, ReplayCosts(profiles[False], args.refine, profiles[True]), args.tree_width,
                      args.tree_extra_nodes)
    steps = {(r["temperature"], r["batch_size"], r["controller"]): r.pop("step_log") for r in real if "step_log" in r}
    oracles = ["oracle", "tree-oracle"] if args.trees else ["oracle"]
    replayed = sweep(engines, prompts, here, chosen, oracles, args, label="bench spec (replay)")
    for records, backend in ((real, "engine"), (replayed, "replay")):
        add_ratios(records)
        for r in records:
            r["backend"] = backend
    engine = {(r["temperature"], r["batch_size"], r["controller"]): r for r in real}
    for r in replayed:
        e = engine[r["temperature"], r["batch_size"], r["controller"]]
        r["error_tokens_per_s"] = _over_rounds(r) / _over_rounds(e) - 1
        if len(e.get("rounds", [])) > 1:
            e["round_spread"] = max(e["rounds"]) / min(e["rounds"]) - 1
        r["error_draft_len"] = r["mean_draft_len"] / e["mean_draft_len"] - 1 if e["mean_draft_len"] > 0 else None
        log = steps.get((r["temperature"], r["batch_size"], r["controller"]))
        if log:  # the replay's step costs on the engine's own steps: step-time error alone, per part
            cost = engines.companion_step_time if needs_companion(r["controller"]) else engines.step_time
            e["step_error"] = step_error(cost, log)
            r["error_step_time"] = e["step_error"]["total"]
    timed = [r["error_step_time"] for r in replayed if "error_step_time" in r]
    level = float(np.exp(np.mean(np.log1p(timed)))) if timed else 1.0
    for r in replayed:
        r["error_tokens_per_s_level"] = (1 + r["error_tokens_per_s"]) * level - 1
    lens = [abs(r["error_draft_len"]) for r in replayed if r["error_draft_len"] is not None]
    spread = [e["round_spread"] for e in real if "round_spread" in e]

    def median(values: list[float]) -> float | None:
        return float(np.median(np.abs(values))) if values else None

    errors = [r["error_tokens_per_s"] for r in replayed]
    summary = {"runs": len(replayed), "median_abs_error_tokens_per_s": median(errors),
               "mean_abs_error_tokens_per_s": float(np.mean(np.abs(errors))),
               "median_abs_error_step_time": median(timed), "profile_level": level,
               "median_abs_error_tokens_per_s_level_matched": median([r["error_tokens_per_s_level"] for r in replayed]),
               "median_engine_round_spread": median(spread),
               "draft_len_within_10pct": sum(e <= 0.10 for e in lens) / max(len(lens), 1),
               "median_abs_error_draft_len": median(lens)}  # fmt: skip
    print(format_table(replayed, ["temperature", "batch_size", "controller", "tokens_per_s", "error_tokens_per_s",
                                  "error_tokens_per_s_level", "error_step_time", "mean_draft_len",
                                  "error_draft_len"]))  # fmt: skip
    print("replay vs engine:", summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logged = [{"temperature": t, "batch_size": b, "controller": c, "steps": logged_steps(log)}
              for (t, b, c), log in steps.items()]  # fmt: skip
    stem = "spec_trees_validate" if args.trees else "spec_validate"
    write_json(out / f"{stem}_steps.json", logged, {"profiles": {str(k): p.meta for k, p in profiles.items()}})
    write_json(out / f"{stem}.json", [*real, *replayed], {**meta, "validation": summary,
               "traces": traces.meta.get("models"), "args": _settings(args)})  # fmt: skip
    return [*real, *replayed]
