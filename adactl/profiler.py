"""`adactl profile`: measure what engine steps cost on this machine, and find the profile a run uses.

    adactl profile                                  # the default pair, on auto device, float32
    adactl profile --device cuda --dtype bfloat16   # another machine is another profile
    adactl profile --draft none                     # the target alone (streaming serves plain)

`measure` grows one batch (1, 2, 4, ... `--max-batch` requests of random prompts, prefilled
in chunks: those are the prefill samples), and at each batch size runs every draft length
(0, 1, 2, 3, 4, 6, 8) a few times in a shuffled order: a third verifying whole drafts, a
third a random prefix per row (verify controllers cut drafts), a third with only a few rows
drafting (SLO-customised plans). It stops at its time budget (65 s by default: at most 90 s
in all on 2 CPU cores, loading included), fits the cost basis (adactl.estimators.step_cost) and saves the profile
under `$ADACTL_CACHE/profiles/<fingerprint key>.json`.

`step_cost_for` is what benches, the server and the envs call: the profile that matches this
machine, created on first use (a progress bar and one line saying so); or a file named with
`--profile`, which is used even if it was made elsewhere (training on this CPU against a
GPU's costs), but never silently: a line names what differs.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from adactl import settings
from adactl.estimators.step_cost import Fingerprint, LinearStepCost, ProfileError, StepCostProfile
from adactl.estimators.step_time import StepShape
from adactl.settings import DeviceSettings, setting

DRAFT_LENGTHS = (0, 1, 2, 3, 4, 6, 8)


def fingerprint(specs: dict[str, str], device: torch.device | str, dtype: torch.dtype) -> Fingerprint:
    """The fingerprint of these models on this machine (device, dtype, torch, threads)."""
    from adactl.runtime.device import describe

    m = describe(device, dtype)
    return Fingerprint(specs.get("target", "?"), specs.get("draft", "none") or "none",
                       specs.get("companion", "none") or "none", m.device_type, m.device_name, m.dtype, m.torch,
                       m.threads)  # fmt: skip


def profile_dir() -> Path:
    from adactl.runtime.models import cache_dir

    return cache_dir() / "profiles"


def cached_path(fp: Fingerprint) -> Path:
    return profile_dir() / f"{fp.key()}.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(engine: Any, device: torch.device, vocab: int, max_batch: int = 64, budget_s: float = 65.0,
            reps: int = 3, seed: int = 0, max_k: int = 8,
            progress: bool = True) -> tuple[list[StepShape], np.ndarray]:  # fmt: skip
    """Shapes and [N, 3] prefill/draft/verify seconds of steps on `engine` (see the module docstring)."""
    from adactl.runtime import SamplingParams, StepPlan

    rng = random.Random(seed)
    ks = [k for k in DRAFT_LENGTHS if k <= max_k] if getattr(engine, "draft", None) is not None else [0]
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch] or [1]
    shapes: list[StepShape] = []
    seconds: list[tuple[float, float, float]] = []
    start = time.perf_counter()
    sampling = SamplingParams(max_new_tokens=4096, stop_on_eos=False)

    def step(plan: Any, cut_mode: int = 0) -> None:
        drafts = engine.draft_step(plan)
        cut = drafts.draft_len.clone()
        if cut_mode == 1:
            cut = torch.tensor([rng.randint(0, int(n)) for n in drafts.draft_len], dtype=torch.long)
        outcome = engine.verify(cut)
        _sync(device)
        context = int(drafts.context_len.sum())
        shapes.append(StepShape.of_lengths(cut, drafts.draft_len, int(outcome.prefill_tokens), context))
        seconds.append((outcome.prefill_s, outcome.draft_s, outcome.verify_s))

    per_batch = [(reps if b < 32 else max(1, reps - 1)) * len(ks) + 2 for b in batches]
    bar = tqdm(total=sum(per_batch), desc="adactl profile", unit="step", disable=not progress)
    engine_ids: list[str] = []
    for b in batches:
        while len(engine_ids) < b:  # grow the batch: new rows prefill in chunks next to the running rows
            n = rng.randint(16, 96)
            engine_ids.append(engine.add_request([rng.randrange(1, vocab) for _ in range(n)], sampling))
        while any(v.status != "running" for v in engine.requests()):
            step(StepPlan(draft_len=0, prefill_budget=rng.choice([64, 128, 256, 512])))
        for _ in range(2):  # warm-up at this batch size: its first steps allocate
            engine.draft_step(StepPlan(draft_len=min(1, max(ks)), prefill_budget=0))
            engine.verify()
            bar.update(1)
        order = [k for k in ks for _ in range(reps if b < 32 else max(1, reps - 1))]  # big batches: slow steps
        rng.shuffle(order)
        for i, k in enumerate(order):
            if time.perf_counter() - start > budget_s:
                break
            plan = StepPlan(draft_len=k, prefill_budget=0)
            if i % 3 == 2 and b > 1:  # a few rows draft k, the rest 0 or 1
                running = [v.request_id for v in engine.requests()]
                few = rng.randint(1, max(1, b // 4))
                plan = StepPlan(draft_len={r: k if j < few else rng.randint(0, 1) for j, r in enumerate(running)},
                                prefill_budget=0)  # fmt: skip
            step(plan, cut_mode=i % 3)
            bar.update(1)
        if time.perf_counter() - start > budget_s:
            bar.write(f"adactl profile: time budget ({budget_s:.0f} s) reached at batch {b}")
            break
    bar.close()
    for rid in engine_ids:
        engine.cancel(rid)
    engine.draft_step(StepPlan(draft_len=0, prefill_budget=0))
    engine.verify()
    engine.pop_finished()
    return shapes, np.array(seconds, dtype=np.float64)


def make_profile(pair: Any, max_batch: int = 64, budget_s: float = 65.0, reps: int = 3, seed: int = 0,
                 progress: bool = True) -> StepCostProfile:  # fmt: skip
    """Measure `pair` (a `ModelPair`) on its device and fit its step-cost profile."""
    from adactl.runtime import Engine, EngineConfig
    from adactl.runtime.models import output_vocab_size

    fp = fingerprint(pair.model_ids, pair.device, pair.dtype)
    draft = pair.speculator(with_companion=pair.companion is not None)
    engine = Engine(pair.target.model, draft, config=EngineConfig(max_batch_size=max_batch, seed=seed))
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    shapes, seconds = measure(engine, pair.device, output_vocab_size(pair.target.model), max_batch, budget_s, reps,
                              seed, progress=progress)  # fmt: skip
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "profile_s": round(time.perf_counter() - t0, 1),
            "max_batch": max_batch, "reps": reps, "seed": seed, "steps": len(shapes)}  # fmt: skip
    return StepCostProfile.from_steps(fp, shapes, seconds, meta)


def shipped_profile(specs: dict[str, str]) -> Path:
    """The CPU profile shipped for this kind of pair (draft alone, with companion, or none): the
    fallback prior, made with `adactl profile` on the 2-core CPU this project builds on."""
    from adactl.runtime.models import SHIPPED_MODELS

    if specs.get("draft", "none") == "none":
        name = "step_cost_cpu_plain.json"
    elif specs.get("companion", "none") != "none":
        name = "step_cost_cpu_companion.json"
    else:
        name = "step_cost_cpu.json"
    return SHIPPED_MODELS / "estimators" / name


def step_cost_for(pair: Any, profile: str | Path | None = None, refine: bool = True, max_batch: int = 64,
                  budget_s: float = 65.0, log: Any = None) -> LinearStepCost:  # fmt: skip
    """The step-cost model a run on `pair` uses (see the module docstring); `profile="shipped"`:
    the shipped CPU profile as the prior, with nothing measured."""
    say = log or (lambda text: print(text, file=sys.stderr))
    here = fingerprint(pair.model_ids, pair.device, pair.dtype)
    if profile == "shipped":
        profile = shipped_profile(pair.specs)
    if profile is not None:
        loaded = StepCostProfile.load(profile)
        diff = here.differences(loaded.fingerprint)
        if diff:
            how = ", refined online from every step" if refine else " (online refinement off)"
            say(
                f"adactl: step-cost profile {profile} was made for another setup ({'; '.join(diff)}); "
                f"using it as the prior{how}"
            )
        return loaded.model(refine=refine)
    path = cached_path(here)
    if path.is_file():
        try:
            return StepCostProfile.load(path).model(refine=refine)
        except ProfileError as e:
            say(f"adactl: ignoring the cached profile ({e})")
    say(f"adactl: no step-cost profile for {here.machine_label} ({here.target} + {here.draft}"
        f"{' + ' + here.companion if here.companion != 'none' else ''}); measuring one (at most {budget_s:.0f} s) "
        f"-> {path}")  # fmt: skip
    made = make_profile(pair, max_batch=max_batch, budget_s=budget_s)
    made.save(path)
    return made.model(refine=refine)


@dataclass(frozen=True)
class ProfilerSettings(DeviceSettings):
    """`adactl profile`."""

    target: str = setting("smollm2", "target model spec (default: SmolLM2-135M-Instruct)")
    draft: str = setting("draft", "draft spec, or none")
    companion: str = setting("none", "companion spec (SV's signal), or none")
    max_batch: int = setting(64, "the largest batch measured")
    budget_s: float = setting(65.0, "time budget of the measurement")
    reps: int = setting(3, "steps per (batch size, draft length)")
    seed: int = setting(0, "seed of the measured requests")
    out: str | None = setting(None, "also write the profile here (it is always cached)")
    tiny: bool = setting(False, "tiny random models (a smoke run)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, ProfilerSettings)


def main(namespace: argparse.Namespace) -> StepCostProfile:
    return run(settings.from_args(ProfilerSettings, namespace))


def run(args: ProfilerSettings) -> StepCostProfile:
    from adactl.runtime.device import device_and_dtype
    from adactl.runtime.models import load_pair

    if args.max_batch < 1 or args.budget_s <= 0 or args.reps < 1:
        raise SystemExit("adactl profile: --max-batch and --reps must be >= 1 and --budget-s > 0")
    device, dtype = device_and_dtype(args.device, args.dtype)  # before any model loads
    pair = tiny_pair(device, dtype) if args.tiny else load_pair(args.target, args.draft, args.companion, device, dtype)
    made = make_profile(pair, args.max_batch, args.budget_s, args.reps, args.seed)
    path = made.save(cached_path(made.fingerprint))
    if args.out:
        made.save(args.out)
    print(f"{made.meta['steps']} steps in {made.meta['profile_s']} s on {made.fingerprint.machine_label}; "
          f"fit error {100 * made.meta['fit_mape']:.1f}% (mean absolute, relative) -> {path}"
          + (f" and {args.out}" if args.out else ""))  # fmt: skip
    return made


def tiny_pair(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """The smoke runs' pair: a tiny random Llama with a feature draft (no download)."""
    from adactl.runtime import FeatureDraft
    from adactl.runtime.models import LoadedModel, ModelPair, tiny_llama

    target = tiny_llama(vocab_size=256).to(device, dtype)
    draft = FeatureDraft.from_target(target, list(range(192)), 64, seed=1).to(device, dtype).eval()
    specs = {"target": "tiny", "draft": "tiny-feature", "companion": "none"}
    return ModelPair(LoadedModel(target, None, "tiny"), draft, None, torch.device(device), dtype, specs)
