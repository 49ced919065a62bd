"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import random

import torch

from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan


def prompts(n: int, seed: int = 0, vocab: int = 128, max_len: int = 12) -> list[list[int]]:
    """Prompts of different lengths (1 .. max_len tokens), avoiding token 0 (EOS)."""
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def greedy_reference(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """`model.generate` at batch 1, greedy, cut after EOS (what the engine must reproduce)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def random_plan_runner(engine: Engine, seed: int, max_k: int = 4, cut: bool = True, budget: int = 512) -> None:
    """Step `engine` to completion with random per-row, per-step draft lengths (0 included)
    and, if `cut`, a random shorter verify prefix per row."""
    rng = random.Random(seed)
    while engine.has_unfinished():
        running = [v.request_id for v in engine.requests() if v.status == "running"]
        plan = StepPlan(draft_len={r: rng.randint(0, max_k) for r in running}, prefill_budget=budget)
        drafts = engine.draft_step(plan)
        lens = drafts.draft_len.tolist()
        engine.verify([rng.randint(0, k) for k in lens] if cut else None)


def make_engine(target: torch.nn.Module, draft: torch.nn.Module | None, **config: object) -> Engine:
    return Engine(target, draft, config=EngineConfig(**config))  # type: ignore[arg-type]


def engine_with_references(
    target: torch.nn.Module, draft: torch.nn.Module | None, n: int, seed: int, max_new_tokens: int
) -> tuple[Engine, list[str], list[list[int]]]:
    """An engine with `n` greedy requests queued, their ids, and what each yields run alone."""
    ps = prompts(n, seed=seed)
    alone = [greedy_reference(target, p, max_new_tokens) for p in ps]
    engine = make_engine(target, draft)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=max_new_tokens)) for p in ps]
    return engine, ids, alone
