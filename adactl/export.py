"""`adactl export`: what adactl learned about a machine, in the form vLLM and SGLang read.

The schedule is the goodput-optimal draft length (`controllers.goodput.goodput_length`) at
every batch size from 1 to `max_batch`, from the step-cost profile of the machine (`--profile`:
a file from `adactl profile`, or `shipped`) and an acceptance estimate (`--acceptance`: a
fitted moving average, shipped or saved, or `--alpha 0.8` for a flat one):

    c*(B) = argmax_{c <= K} B * (1 + sum_{j < c} prod_{i <= j} alpha_i) / T(B, c)

With `--policy`, a learned SpecDecode-v0 policy's choice at each batch size replaces the
rule (a per-row policy: the length its requests draft when all are alike). Consecutive batch
sizes with the same choice form one range. Written as
- vLLM: `num_speculative_tokens_per_batch_size`, a list of `[lo, hi, K]` in the
  `speculative_config` a user passes to `vllm serve --speculative-config`;
- SGLang: the `--speculative-adaptive-config` file, keyed by each range's lower bound, each
  with its `candidate_steps` (one value: that K; `--candidates N` lists the N best, for
  SGLang's own online choice among them).
Each file is checked against the engine's rules (`check_vllm`, `check_sglang`) before it is
written; a malformed profile or an impossible request is an `ExportError` that says which.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adactl import settings
from adactl.settings import setting


class ExportError(ValueError):
    """A schedule that cannot be exported: a bad profile, estimate or request, or a file that
    breaks the target engine's rules."""


# ------------------------------------------------------------------ the schedule
def schedule(step_time: Any, alpha: torch.Tensor, max_batch: int, context: int = 256, margin: float = 0.03,
             candidates: int = 1) -> list[list[int]]:  # fmt: skip
    """The best draft lengths at each batch size 1..max_batch (`candidates` of them, best
    first), for requests of `context` tokens each."""
    from adactl.controllers.goodput import goodput_rates, shortest_within

    if max_batch < 1 or context < 1 or candidates < 1:
        raise ExportError(f"max_batch, context and candidates must be >= 1, got {max_batch}, {context}, {candidates}")
    if alpha.ndim != 1 or not len(alpha) or not bool(((alpha >= 0) & (alpha <= 1)).all()):
        raise ExportError(f"acceptance must be 1 to K probabilities in [0, 1], got {alpha.tolist()}")
    out = []
    for rows in range(1, max_batch + 1):
        rates = goodput_rates(step_time, alpha, rows, rows * context)  # once per batch size
        best = shortest_within(rates, margin)  # goodput_length's rule
        others = [int(c) for c in np.argsort(-rates, kind="stable") if int(c) != best]
        out.append([best, *others[: candidates - 1]])  # candidates == 1: [best]
    return out


def policy_schedule(policy: str | Path, step_time: Any, max_batch: int, context: int = 256) -> list[list[int]]:
    """The draft length a learned SpecDecode-v0 policy (`LearnedController`) chooses at each
    batch size 1..max_batch, every request `context` tokens long and none waiting. Its
    recent-accepted-length feature is set to what its acceptance estimate expects of a full
    draft (a server's running average would be near it)."""
    from adactl.controllers import LearnedController, PolicyError
    from adactl.interface import ScheduleState
    from adactl.runtime.types import RequestView, SamplingParams

    try:
        controller = LearnedController(policy, step_time=step_time)
    except PolicyError as e:
        raise ExportError(str(e)) from None
    if controller.policy.env_id != "adactl/SpecDecode-v0":
        raise ExportError(f"{policy} is a {controller.policy.env_id} policy; a schedule needs a SpecDecode-v0 one")
    k = controller.max_draft_len
    controller.features.accepted_ema = float(torch.cumprod(controller.features.estimator.alpha(k), 0).sum())
    out = []
    for rows in range(1, max_batch + 1):
        views = tuple(RequestView(f"r{i}", "running", context, context, 1, context + 1, 0.0, 0.0, SamplingParams())
                      for i in range(rows))  # fmt: skip
        plan = controller.act(ScheduleState(0.0, views, k))
        lengths = plan.draft_len
        # a per-row policy's requests are alike here: they all draft the same (an empty batch: 0)
        out.append([int(lengths) if isinstance(lengths, int) else max(lengths.values(), default=0)])
    return out


def ranges(per_batch: list[list[int]]) -> list[tuple[int, int, list[int]]]:
    """Consecutive batch sizes (from 1) with the same choice -> (lo, hi, choice)."""
    out: list[tuple[int, int, list[int]]] = []
    for b, choice in enumerate(per_batch, start=1):
        if out and out[-1][2] == choice:
            out[-1] = (out[-1][0], b, choice)
        else:
            out.append((b, b, choice))
    return out


# ------------------------------------------------------------------ vLLM
def vllm_config(per_batch: list[list[int]], num_speculative_tokens: int, base: dict[str, Any] | None = None
                ) -> dict[str, Any]:  # fmt: skip
    """vLLM's `speculative_config` with the schedule (`base`: method, model, ... as the user has them)."""
    config = dict(base or {})
    config["num_speculative_tokens"] = num_speculative_tokens
    config["num_speculative_tokens_per_batch_size"] = [[lo, hi, choice[0]] for lo, hi, choice in ranges(per_batch)]
    check_vllm(config)
    return config


def check_vllm(config: dict[str, Any]) -> None:
    """vLLM's rules (`v1/spec_decode/dynamic/utils.py`, `validate_and_normalize_dynamic_sd_schedule`):
    a non-empty list of [lo, hi, K] integer triples (both ends inclusive), the first starting at
    batch size 1, lo <= hi, no two ranges overlapping (gaps take the range before them; the last
    range covers every larger batch), 0 <= K <= num_speculative_tokens (vLLM clamps a larger K
    silently; its docs require it, and so does this check)."""
    k_max = config.get("num_speculative_tokens")
    if not isinstance(k_max, int) or isinstance(k_max, bool) or k_max < 1:
        raise ExportError(f"num_speculative_tokens must be a positive integer, got {k_max!r}")
    table = config.get("num_speculative_tokens_per_batch_size")
    if not isinstance(table, list) or not table:
        raise ExportError("num_speculative_tokens_per_batch_size must be a non-empty list of [lo, hi, K]")
    last_hi = 0
    for i, entry in enumerate(table):
        if not (isinstance(entry, list) and len(entry) == 3 and all(type(x) is int for x in entry)):
            raise ExportError(f"range {i} must be [lo, hi, K] integers, got {entry!r}")
        lo, hi, k = entry
        if i == 0 and lo != 1:
            raise ExportError(f"the first range must start at batch size 1, got {entry}")
        if lo > hi:
            raise ExportError(f"range {i} is empty (lo > hi): {entry}")
        if lo <= last_hi:
            raise ExportError(f"range {i} {entry} overlaps the one before it (which ends at {last_hi})")
        if not 0 <= k <= k_max:
            raise ExportError(f"range {i} {entry}: K must be in 0..num_speculative_tokens ({k_max})")
        last_hi = hi


# ------------------------------------------------------------------ SGLang
def sglang_config(per_batch: list[list[int]], cuda_graph_bs: list[int] | None = None) -> dict[str, Any]:
    """SGLang's `--speculative-adaptive-config`: each range's lower bound -> its candidate steps.

    SGLang pads a live batch up to the next captured CUDA-graph batch size before it looks up a
    slot; given those sizes (`cuda_graph_bs`), the slots are keyed at them, each with the choice
    for that size, so every batch gets the choice of the size it runs at."""
    canonical = [sorted(set(choice)) for choice in per_batch]  # a bucket's candidates as a set
    if cuda_graph_bs:
        sizes = sorted({b for b in cuda_graph_bs if 1 <= b <= len(canonical)})
        if not sizes:
            raise ExportError(f"no CUDA-graph batch size in 1..{len(canonical)}: {cuda_graph_bs}")
        config: dict[str, Any] = {}
        last: list[int] | None = None
        for b in sizes:
            if canonical[b - 1] != last:
                config[str(b)] = {"candidate_steps": canonical[b - 1]}
                last = canonical[b - 1]
    else:
        config = {str(lo): {"candidate_steps": choice} for lo, _, choice in ranges(canonical)}
    check_sglang(config)
    return config


SGLANG_GLOBALS = {"ema_alpha": float, "update_interval": int, "warmup_batches": int}
SGLANG_SLOT = {"up_hysteresis": float, "down_hysteresis": float, "ceiling_coeff": float}


def check_sglang(config: dict[str, Any]) -> None:
    """SGLang's rules (`adaptive_spec_params._load_adaptive_config`): at least one slot, keyed by
    its batch-size lower bound in digits; each slot an object whose `candidate_steps` is a
    non-empty list of non-negative integers (0: no draft, read by recent SGLang; its docs still
    say positive); the optional knobs, global (`ema_alpha`, `update_interval`,
    `warmup_batches`) or per slot (`up_hysteresis`, `down_hysteresis`, `ceiling_coeff`), numbers."""
    if not isinstance(config, dict) or not any(isinstance(k, str) and k.isdigit() for k in config):
        raise ExportError("an adaptive config maps batch-size lower bounds (digits) to {'candidate_steps': [...]}")
    for key, value in config.items():
        if key in SGLANG_GLOBALS:
            _number(key, value, SGLANG_GLOBALS[key])
            continue
        if not (isinstance(key, str) and key.isdigit()):
            known = list(SGLANG_GLOBALS)
            raise ExportError(f"key {key!r} is neither a batch-size lower bound (digits) nor one of {known}")
        if not isinstance(value, dict):
            raise ExportError(f"slot {key}: must be an object with candidate_steps, got {value!r}")
        steps = value.get("candidate_steps")
        if not isinstance(steps, list) or not steps:
            raise ExportError(f"slot {key}: candidate_steps must be a non-empty list")
        if any(type(s) is not int or s < 0 for s in steps) or len(set(steps)) != len(steps):
            raise ExportError(f"slot {key}: candidate_steps must be distinct non-negative integers, got {steps}")
        for knob, kind in SGLANG_SLOT.items():
            if knob in value:
                _number(f"slot {key}: {knob}", value[knob], kind)


def _number(name: str, value: Any, kind: type) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or type(value) is int)
    if not ok:
        raise ExportError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")


# ------------------------------------------------------------------ command
@dataclass(frozen=True)
class ExportSettings:
    """`adactl export vllm|sglang`."""

    engine: str = setting("vllm", "the engine to write for", choices=["vllm", "sglang"])
    profile: str = setting("shipped", "a step-cost profile file (adactl profile --out), a computed GPU profile "
                           "by name (h100-llama-3.1-8b, ...), or 'shipped' (the CPU profile shipped with "
                           "adactl)")  # fmt: skip
    acceptance: str = setting("moving_average", "an acceptance estimate with per-position alpha: 'moving_average' "
                              "(shipped) or a saved MovingAverage JSON")  # fmt: skip
    alpha: float | None = setting(None, "a flat acceptance per position instead of --acceptance", parse=float)
    policy: str | None = setting(None, "a learned SpecDecode-v0 policy to evaluate over batch sizes instead of the "
                                 "goodput rule: a file (train/ppo.py), 'shipped' (ours, this CPU's), or a shipped "
                                 "policy by name (SpecDecode-v0-h100: the computed H100's, per row)")  # fmt: skip
    num_speculative_tokens: int = setting(4, "K, the most draft tokens per step (the engine's own setting)")
    max_batch: int = setting(256, "the largest batch size scheduled")
    context: int = setting(256, "tokens of context per request the costs assume")
    candidates: int = setting(1, "sglang: candidate steps per bucket (more: SGLang chooses among them online)")
    base: str = setting("{}", "vllm: the rest of your speculative_config as JSON (method, model, ...)")
    cuda_graph_bs: list[int] | None = setting(None, "sglang: the batch sizes it captures CUDA graphs at, comma-"
                                              "separated (slots keyed at them)", parse=settings.ints)  # fmt: skip
    out: str | None = setting(None, "the file to write (default: print it)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`adactl export vllm|sglang` (the engine is the subcommand)."""
    engines = parser.add_subparsers(dest="engine", required=True)
    for engine, summary in (("vllm", "vLLM's num_speculative_tokens_per_batch_size in a speculative_config"),
                            ("sglang", "SGLang's --speculative-adaptive-config file")):  # fmt: skip
        settings.add_arguments(engines.add_parser(engine, help=summary), ExportSettings, skip=("engine",))


def main(namespace: argparse.Namespace) -> dict[str, Any]:
    return run(settings.from_args(ExportSettings, namespace))


def run(args: ExportSettings) -> dict[str, Any]:
    from adactl.estimators.step_cost import ProfileError, StepCostProfile
    from adactl.runtime.models import SHIPPED_MODELS

    if args.num_speculative_tokens < 1:
        raise ExportError(f"--num-speculative-tokens must be >= 1, got {args.num_speculative_tokens}")
    from adactl.profiler import named_profile

    path = SHIPPED_MODELS / "estimators" / "step_cost_cpu.json" if args.profile == "shipped" else Path(
        named_profile(args.profile))  # fmt: skip
    try:
        step_time = StepCostProfile.load(path).model(refine=False)
    except ProfileError as e:
        raise ExportError(str(e)) from None
    if args.policy:
        name = "SpecDecode-v0" if args.policy == "shipped" else args.policy
        shipped = SHIPPED_MODELS / "policies" / f"{name}.safetensors"
        # a shipped policy by name (its path in the error if it is missing), or a file
        policy = shipped if shipped.is_file() or args.policy == "shipped" else args.policy
        per_batch = policy_schedule(policy, step_time, args.max_batch, args.context)
    else:
        per_batch = schedule(step_time, _alpha(args), args.max_batch, args.context, candidates=args.candidates)
    if max(c[0] for c in per_batch) > args.num_speculative_tokens:
        raise ExportError(f"the schedule drafts up to {max(c[0] for c in per_batch)} tokens, more than "
                          f"--num-speculative-tokens {args.num_speculative_tokens}")  # fmt: skip
    if args.engine == "vllm":
        try:
            base = json.loads(args.base)
        except json.JSONDecodeError as e:
            raise ExportError(f"--base is not JSON: {e}") from None
        config = vllm_config(per_batch, args.num_speculative_tokens, base)
    else:
        config = sglang_config(per_batch, args.cuda_graph_bs)
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in config.items()) + "\n}"
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}: {len(ranges(per_batch))} batch-size ranges, K in "
              f"{sorted({c[0] for c in per_batch})} (profile {path})")  # fmt: skip
    else:
        print(text)
    return config


def _alpha(args: ExportSettings) -> torch.Tensor:
    k = args.num_speculative_tokens
    if args.alpha is not None:
        if not 0.0 <= args.alpha <= 1.0:
            raise ExportError(f"--alpha must be a probability, got {args.alpha}")
        return torch.full((k,), float(args.alpha))
    from adactl.estimators import MovingAverage, load_acceptance

    try:
        estimate = load_acceptance(args.acceptance)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ExportError(f"acceptance estimate {args.acceptance!r}: {e}") from None
    if not isinstance(estimate, MovingAverage):
        raise ExportError(f"{args.acceptance!r} is a {type(estimate).__name__}; the schedule needs per-position "
                          "acceptance known before drafting (a moving_average), or --alpha")  # fmt: skip
    return estimate.alpha(k)
