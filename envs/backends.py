"""What the environments step: a real `Engine` or the profile-replay `ReplayEngine`, with the
estimators and workload each needs.

- `"replay"`: `ReplayEngine` with the step-time model fitted on the real engine's profile
  (`models/estimators/step_time*.skops`, this CPU's), or the costs of a step-cost profile
  from any machine (`profile=`: a file made by `adactl profile`, or a computed GPU profile by
  name, `h100-llama-3.1-8b`, whose physics prices the replayed steps while the features read
  its fitted model, as in `bench spec --replay`: train on this CPU for a GPU), and the
  shipped per-position acceptance; prompt and reply lengths are those of ShareGPT requests
  (measured once with the tokenizer and cached in memory), so no model runs. Deterministic
  for a seed. With `traces=` (a shipped workload's recorded per-request acceptance,
  `adactl.runtime.traces`), each request follows one recorded request: its prompt length,
  its length and its acceptance at every position.
- `"real"`: `Engine` on the default models (SmolLM2-135M-Instruct + the shipped feature
  draft), or tiny random Llamas with `model="tiny"` (tests), on `device` in `dtype`. Step
  times are measured; the features' step costs are this machine's profile (or `profile=`).

Models and prompts load once per process and are shared by every env in it.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import numpy as np
import torch

BACKENDS = ("replay", "real")
PROMPT_SETS = ("sharegpt", "sharegpt-heldout", "humaneval")
MODELS = ("default", "tiny")
TRACE_SETS = ("sharegpt", "humaneval", "mixed")
TRACE_SPLITS = ("train", "heldout", "all")


def _check(backend: str, prompts: str, model: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if prompts not in PROMPT_SETS:
        raise ValueError(f"prompts must be one of {PROMPT_SETS}, got {prompts!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")


@functools.cache
def _pair(model: str, with_draft: bool, device: str, dtype: str) -> Any:
    """The env's `ModelPair`: the default pair, or tiny random Llamas (loaded once per process)."""
    from adactl.runtime.models import LoadedModel, ModelPair, load_pair, perturbed_copy, tiny_llama

    if model == "default":
        return load_pair("smollm2", "draft" if with_draft else None, None, device, dtype)
    from adactl.runtime.device import device_and_dtype

    dev, dt = device_and_dtype(device, dtype)
    target = tiny_llama().to(dev, dt)
    draft = perturbed_copy(target, noise=0.03, seed=1) if with_draft else None
    specs = {"target": "tiny-env", "draft": "tiny-perturbed" if with_draft else "none", "companion": "none"}
    return ModelPair(LoadedModel(target, None, "tiny-env"), draft, None, dev, dt, specs)


@functools.cache
def _requests(prompts: str, count: int = 256) -> tuple[tuple[tuple[int, ...], int], ...]:
    """(prompt ids, reply length) pairs of a prompt set, with the default tokenizer."""
    from transformers import AutoTokenizer

    from adactl.runtime.models import default_target_dir
    from adactl.workloads import built_apart, chat_requests, humaneval_prompts, read_sharegpt

    tokenizer = AutoTokenizer.from_pretrained(default_target_dir())
    if prompts == "humaneval":
        return tuple((tuple(p), 128) for p in humaneval_prompts(tokenizer, 140, 256))  # 141 of 164 fit
    pairs = built_apart(lambda: chat_requests(tokenizer, count, 256, 256, read_sharegpt(),
                                              held_out=prompts == "sharegpt-heldout"))  # fmt: skip (a child's)
    return tuple((tuple(p), n) for p, n in pairs)


@functools.cache
def _traces(workload: str, split: str) -> Any:
    """The shipped chain traces of `workload`, greedy and at 0.7; `split`: every other request
    from the first ("train"), the others ("heldout"), or all, per recording, so each split
    keeps the workload's mix."""
    from adactl.runtime.traces import AcceptanceTraces, shipped_traces

    every = shipped_traces(workload, trees=False)
    if split == "all":
        return every
    seen: dict[tuple[str, bool], int] = {}
    kept = []
    for t in every.requests:
        n = seen.get((t.group, t.greedy), 0)
        seen[(t.group, t.greedy)] = n + 1
        if n % 2 == (split == "heldout"):
            kept.append(t)
    return AcceptanceTraces(kept, dict(every.meta))


def shipped_alpha(k: int) -> list[float]:
    from adactl.runtime.models import SHIPPED_MODELS

    mean = json.loads((SHIPPED_MODELS / "estimators" / "moving_average.json").read_text())["mean"]
    return [float(a) for a in mean[:k]]


class Backend:
    """Makes engines for one env: `new_engine(seed)`, `request(rng)`, `step_time`, `clock`."""

    def __init__(self, backend: str = "replay", prompts: str = "sharegpt", model: str = "default",
                 noise: float = 0.05, max_batch_size: int = 64, draft: bool = True, max_draft_len: int = 8,
                 step_time: Any = None, device: str = "auto", dtype: str = "auto",
                 profile: str | None = None, traces: str | None = None,
                 trace_split: str = "all") -> None:  # fmt: skip
        _check(backend, prompts, model)
        if traces is not None and (backend != "replay" or model != "default"):
            raise ValueError("traces are the default pair's, replayed: backend='replay', model='default'")
        if traces is not None and traces not in TRACE_SETS:
            raise ValueError(f"traces must be one of {TRACE_SETS}, got {traces!r}")
        if trace_split not in TRACE_SPLITS:
            raise ValueError(f"trace_split must be one of {TRACE_SPLITS}, got {trace_split!r}")
        self.traces = _traces(traces, trace_split) if traces is not None else None
        self.kind, self.prompts, self.model, self.noise = backend, prompts, model, noise
        self.max_batch_size, self.draft, self.max_draft_len = max_batch_size, draft, max_draft_len
        self.pair = None
        self.replay_time: Any = None  # what a replayed step costs (None: `step_time`, the features' model)
        if backend == "real":  # device, dtype and profile are checked before any model loads
            from adactl.runtime.device import device_and_dtype

            device_and_dtype(device, dtype)
            if profile is not None:
                from adactl.estimators.step_cost import StepCostProfile

                StepCostProfile.load(profile)
            self.pair = _pair(model, draft, device, dtype)
        if step_time is None and self.pair is not None:
            from adactl.profiler import step_cost_for

            step_time = step_cost_for(self.pair, profile, refine=False, max_batch=max_batch_size)
        elif step_time is None and profile is not None:
            from adactl.estimators.gpu_cost import replay_truth
            from adactl.estimators.step_cost import StepCostProfile
            from adactl.profiler import named_profile

            loaded = StepCostProfile.load(named_profile(profile))
            step_time = loaded.model(refine=False)
            self.replay_time = replay_truth(loaded)  # a computed GPU profile's physics, as bench spec --replay
        if step_time is None:
            from adactl.estimators.step_time import shipped_step_time, tiny_step_time

            step_time = tiny_step_time() if model == "tiny" else shipped_step_time(
                "step_time" if draft else "step_time_plain")  # fmt: skip
        self.step_time = step_time

    @property
    def deterministic(self) -> bool:
        return self.kind == "replay"

    def new_engine(self, seed: int, alpha_scale: float = 1.0) -> Any:
        """alpha_scale (replay only): multiplies the acceptance of every draft position, to
        randomise the acceptance level per episode (the real engine's is what it is)."""
        if self.kind == "replay":
            from adactl.runtime.replay import ReplayEngine

            alpha = shipped_alpha(self.max_draft_len) if self.draft and self.model == "default" else (
                [0.6] * self.max_draft_len if self.draft else [])  # fmt: skip
            alpha = [min(max(a * alpha_scale, 0.01), 0.99) for a in alpha]
            truth = self.replay_time if self.replay_time is not None else self.step_time
            return ReplayEngine(truth, alpha, self.max_batch_size, noise=self.noise, seed=seed,
                                traces=self.traces)  # fmt: skip
        from adactl.runtime import Engine, EngineConfig

        assert self.pair is not None
        torch.manual_seed(seed)
        return Engine(self.pair.target.model, self.pair.draft, self.pair.tokenizer,
                      config=EngineConfig(max_batch_size=self.max_batch_size, seed=seed))  # fmt: skip

    def clock(self, engine: Any) -> float:
        return engine.clock() if hasattr(engine, "clock") else time.perf_counter()

    def request(self, rng: np.random.Generator) -> tuple[Any, int]:
        """(prompt: ids, or a length for the replay; the reply's length) of a random request."""
        if self.model == "tiny":
            n = int(rng.integers(4, 24))
            prompt = rng.integers(1, 128, n).tolist()
            return (n if self.kind == "replay" else prompt), int(rng.integers(8, 32))
        pairs = _requests(self.prompts)
        ids, reply = pairs[int(rng.integers(len(pairs)))]
        return (len(ids) if self.kind == "replay" else list(ids)), reply

    def trace(self, rng: np.random.Generator) -> Any:
        """A random recorded request to replay (`RequestTrace`), or None without traces."""
        if self.traces is None:
            return None
        return self.traces.requests[int(rng.integers(len(self.traces)))]

    def new_estimator(self) -> Any:
        from adactl.estimators import MovingAverage, load_acceptance

        if self.model == "tiny":
            return MovingAverage()
        return load_acceptance("moving_average")


def reseed(env: Any, seed: int | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """An episode's start (after gym's own `reset`): a new generator `env._rng` when `seed` is
    given (the same seed, the same episode); the reset's options, {} for none."""
    if seed is not None:
        env._rng = np.random.default_rng(seed)
    return options or {}
