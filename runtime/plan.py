"""What a `StepPlan` means for the engine's requests: checked, then read into each running
request's draft (a chain length or a tree) and the row segments of the step.

Plain functions of the plan and the requests; the engine calls them at the top of a step.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch

from .rows import Request
from .tree import chain_spec
from .types import RequestError, StepPlan, TreeSpec


def check_plan(plan: StepPlan, running: list[Request], waiting: dict[str, Request]) -> tuple[set[str], list[Request]]:
    """The running requests that decode, and the waiting ones to prefill (in order). Raises
    `RequestError` saying what is wrong (nothing has changed then)."""
    if not isinstance(plan.prefill_budget, int) or plan.prefill_budget < 0:
        raise RequestError(f"prefill_budget must be an integer >= 0, got {plan.prefill_budget!r}")
    lens = plan.draft_len.values() if isinstance(plan.draft_len, Mapping) else [plan.draft_len]
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in lens):
        raise RequestError(f"draft lengths must be integers >= 0, got {plan.draft_len!r}")
    ids = {r.request_id for r in running}
    if plan.tree is not None:
        trees = plan.tree.values() if isinstance(plan.tree, Mapping) else [plan.tree]
        for spec in trees:
            if not isinstance(spec, TreeSpec):
                raise RequestError(f"plan.tree must hold adactl.runtime.TreeSpec, got {type(spec).__name__}")
            spec.validate()
        if isinstance(plan.tree, Mapping) and not set(plan.tree) <= ids:
            raise RequestError(f"plan.tree names requests that are not running: {sorted(set(plan.tree) - ids)[:5]}")
    run_ids = ids if plan.run is None else set(plan.run)
    if not run_ids <= ids:
        raise RequestError(f"plan.run names requests that are not running: {sorted(run_ids - ids)[:5]}")
    if plan.admit is None:
        return run_ids, list(waiting.values())
    unknown = [r for r in plan.admit if r not in waiting]
    if unknown:
        raise RequestError(f"plan.admit names requests that are not waiting: {unknown[:5]}")
    return run_ids, [waiting[r] for r in plan.admit]


def draft_len(req: Request, spec: int | Mapping[str, int], max_context: int) -> int:
    """Tokens `req` drafts under `spec`, clipped to what it can still emit (a step emits at
    most k + 1)."""
    k = spec.get(req.request_id, 0) if isinstance(spec, Mapping) else spec
    room = min(req.sampling.max_new_tokens - len(req.output), max_context - req.context_len)
    return max(0, min(k, room - 1))


def tree_specs(running: list[Request], plan: StepPlan, max_context: int) -> dict[str, TreeSpec]:
    """Each running request's tree this step (chains of `draft_len` for requests the plan
    gives no tree), clipped to what the request can still emit."""
    specs = {}
    for r in running:
        spec = plan.tree.get(r.request_id) if isinstance(plan.tree, Mapping) else plan.tree
        if spec is None:
            spec = chain_spec(draft_len(r, plan.draft_len, max_context))
        room = draft_len(r, spec.depth, max_context)
        if room == 0 or spec.max_nodes == 0:
            spec = chain_spec(0)
        elif room < spec.depth:
            spec = TreeSpec(depth=room, width=spec.width, nodes=spec.nodes)
        specs[r.request_id] = spec
    return specs


def segments(
    rows: list[Request], run_ids: set[str], plan: StepPlan, max_context: int, can_draft: bool
) -> tuple[list[list[Request]], dict[str, int], dict[str, TreeSpec] | None]:
    """The step's row segments [drafting rows, by draft shape, longest (deepest) first | rows
    that decode without drafting | deferred rows], each request's draft length (a tree's node
    budget) and, for a tree step, each request's tree."""
    running = [r for r in rows if r.request_id in run_ids]
    specs = tree_specs(running, plan, max_context) if plan.tree is not None and can_draft else None
    if specs is not None:  # rows still expanding at each level must be a prefix: deepest first
        lens = {rid: spec.max_nodes for rid, spec in specs.items()}
        key = {rid: (spec.depth, spec.max_nodes) for rid, spec in specs.items()}
    else:
        lens = {r.request_id: draft_len(r, plan.draft_len, max_context) if can_draft else 0 for r in running}
        key = {rid: (k, k) for rid, k in lens.items()}
    drafting = sorted((r for r in running if lens[r.request_id] > 0), key=lambda r: key[r.request_id], reverse=True)
    by_key = [list(g) for _, g in itertools.groupby(drafting, key=lambda r: key[r.request_id])]
    plain = [r for r in running if lens[r.request_id] == 0]
    deferred = [r for r in rows if r.request_id not in run_ids]
    return [*by_key, plain, deferred], lens, specs


def check_cut(verify_len: Sequence[int] | torch.Tensor | None, drafted: torch.Tensor) -> torch.Tensor:
    """[B] verify lengths on the CPU, each in [0, drafted]; None = verify everything."""
    if verify_len is None:
        return drafted.clone()
    cut = torch.as_tensor(verify_len).to(torch.long).flatten().cpu()
    if cut.shape[0] != drafted.shape[0]:
        raise RequestError(f"verify_len has {cut.shape[0]} entries but {drafted.shape[0]} rows decode this step")
    bad = (cut < 0) | (cut > drafted)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise RequestError(
            f"verify_len[{i}] = {int(cut[i])} is outside [0, {int(drafted[i])}] (the row's draft length)"
        )
    return cut
