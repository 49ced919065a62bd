"""The estimate-then-act interface (DESIGN.md section 2).

Each engine step has two decision points:

- **schedule**, before drafting: admit which waiting requests, run or defer which running
  ones, the prefill token budget, how many tokens each running request drafts (a `StepPlan`);
- **verify**, after drafting, with the draft distributions known: how long a prefix of each
  draft the target verifies (`[B]` lengths in `[0, draft_len]`).

An **estimator** turns a state into utilities (`estimate`) and learns from what the step did
(`update`). A **controller** maps a state and its estimator's utilities to an action (`act`)
and may learn too (`update`). Everything here is plain data (tensors with a shape comment on
every field) with no engine internals, so a server that is not `adactl.runtime` builds the
same states and calls the same estimators and controllers (tests/test_interface.py does, by
hand). `adactl.loop.ControlLoop` drives our engine with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch

from adactl.runtime.types import DraftBatch, KVState, RequestError, RequestView, StepOutcome, StepPlan, TreeSpec


@dataclass(frozen=True)
class ScheduleState:
    """What a schedule controller sees before drafting."""

    now: float  # seconds on the server's clock (time.perf_counter() in our loop)
    requests: tuple[RequestView, ...]  # [R] unfinished requests: waiting/prefilling, then running
    max_draft_len: int  # the longest draft a request may be given (0: the server has no draft model)
    plan: StepPlan = field(default_factory=StepPlan)  # the plan so far: the safe default, then earlier controllers'
    step: int = 0  # steps run before this one
    kv: KVState | None = None  # the server's KV memory (None: it reports none; memory never binds)
    max_batch: int | None = None  # the most requests the server runs or prefills at once (None: it reports none)

    @property
    def running(self) -> list[RequestView]:
        return [r for r in self.requests if r.status == "running"]

    @property
    def waiting(self) -> list[RequestView]:
        return [r for r in self.requests if r.status != "running"]

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the plan so far prefills this step: what the waiting prompts have left,
        up to its budget (what a length controller prices beside the decode rows)."""
        return min(self.plan.prefill_budget, sum(r.prompt_len - r.prefilled for r in self.waiting))


@dataclass(frozen=True)
class VerifyState:
    """What a verify controller sees after drafting."""

    now: float  # seconds on the server's clock
    drafts: DraftBatch  # [B] decode rows: tokens [B, K], draft_len [B], probs [B, K, V], ...
    requests: tuple[RequestView, ...] = ()  # [R] unfinished requests, for per-request context (SLOs, ages)
    step: int = 0


@dataclass(frozen=True)
class StepRecord:
    """Everything one step decided and did: what estimators and controllers learn from."""

    schedule: ScheduleState  # the state the schedule decision saw (its `plan` field: the default)
    plan: StepPlan  # the plan that ran
    drafts: DraftBatch  # [B] the drafts of the step
    verify_len: torch.Tensor  # [B] long draft tokens sent to the target per row
    outcome: StepOutcome  # [B] accepted per row, timings, emitted tokens
    fallbacks: tuple[str, ...] = ()  # decisions that fell back to the safe action this step
    control_s: float = 0.0  # wall seconds the schedule and verify decisions took (estimate + act)


@dataclass(frozen=True)
class AcceptanceEstimate:
    """Per-row, per-position acceptance probabilities of one step's drafts (DESIGN.md section 4).

    alpha[i, j] is the conditional acceptance P(position j accepted | position j-1 accepted)
    (positions count from 0 here: j = 0 is the first draft token); 0 past a row's draft_len.
    For a token tree (`parents` given, as in `DraftBatch.parents`), position j is node j and
    the condition is its parent: alpha[i, j] = P(node j accepted | its parent accepted).
    """

    alpha: torch.Tensor  # [B, K] float32 in [0, 1]
    parents: torch.Tensor | None = None  # [B, K] long, trees only: parent node, -1 = root child

    @property
    def survival(self) -> torch.Tensor:
        """[B, K] P(position j and every one before it accepted) = prod_{i <= j} alpha_i; for a
        tree, P(node j on the accepted path) = the product of alpha over j and its ancestors."""
        if self.parents is None:
            return torch.cumprod(self.alpha, dim=1)
        return path_products(self.alpha, self.parents)

    def expected_accepted(self) -> torch.Tensor:
        """[B, K + 1] expected accepted draft tokens if the first v are verified, v = 0..K
        (sum of survival over the verified positions; the bonus token is not counted)."""
        zero = torch.zeros(self.alpha.shape[0], 1, dtype=self.alpha.dtype)
        return torch.cat([zero, self.survival.cumsum(1)], dim=1)


def path_products(values: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """[B, K] the product of `values` [B, K] over each node and its ancestors (parents before
    children, -1 = a root child)."""
    out = values.clone()
    rows = torch.arange(values.shape[0])
    for j in range(values.shape[1]):
        p = parents[:, j]
        out[:, j] = torch.where(p >= 0, out[rows, p.clamp(min=0)] * values[:, j], values[:, j])
    return out


@runtime_checkable
class Estimator(Protocol):
    """Turns a state into utilities; learns from outcomes."""

    def estimate(self, state: Any) -> Any: ...

    def update(self, record: StepRecord) -> None: ...


@runtime_checkable
class ScheduleController(Protocol):
    """Decides the step plan. `estimator` (or None) is asked first; its utilities go to `act`."""

    estimator: Estimator | None

    def act(self, state: ScheduleState, utilities: Any) -> StepPlan: ...

    def update(self, record: StepRecord) -> None: ...


@runtime_checkable
class VerifyController(Protocol):
    """Decides how many draft tokens of each row the target verifies."""

    estimator: Estimator | None

    def act(self, state: VerifyState, utilities: Any) -> Sequence[int] | torch.Tensor: ...

    def update(self, record: StepRecord) -> None: ...


class Controller:
    """Convenience base: no estimator, nothing learned. Subclasses define `act`."""

    estimator: Estimator | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def update(self, record: StepRecord) -> None:
        return None


class InvalidAction(ValueError):
    """A controller returned an action the server cannot run."""


def check_plan(plan: Any, state: ScheduleState) -> StepPlan:
    """`plan` if it is a valid plan for `state`, else raise `InvalidAction` saying why."""
    if not isinstance(plan, StepPlan):
        raise InvalidAction(f"a schedule controller must return a StepPlan, got {type(plan).__name__}")
    per_request = isinstance(plan.draft_len, Mapping)
    lens = list(plan.draft_len.values()) if isinstance(plan.draft_len, Mapping) else [plan.draft_len]
    for k in lens:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= max(state.max_draft_len, 0):
            raise InvalidAction(f"draft lengths must be integers in [0, {state.max_draft_len}], got {k!r}")
    if not isinstance(plan.prefill_budget, int) or isinstance(plan.prefill_budget, bool) or plan.prefill_budget < 0:
        raise InvalidAction(f"prefill_budget must be an integer >= 0, got {plan.prefill_budget!r}")
    running = {r.request_id for r in state.running}
    waiting = {r.request_id for r in state.waiting}
    if per_request and not set(plan.draft_len) <= running:  # type: ignore[arg-type]
        extra = sorted(set(plan.draft_len) - running)[:5]  # type: ignore[arg-type]
        raise InvalidAction(f"draft_len names requests that are not running: {extra}")
    if plan.run is not None and not set(plan.run) <= running:
        raise InvalidAction(f"run names requests that are not running: {sorted(set(plan.run) - running)[:5]}")
    if plan.tree is not None:
        specs = list(plan.tree.values()) if isinstance(plan.tree, Mapping) else [plan.tree]
        for spec in specs:
            if not isinstance(spec, TreeSpec):
                raise InvalidAction(f"plan.tree must hold TreeSpec, got {type(spec).__name__}")
            try:
                spec.validate()
            except RequestError as e:
                raise InvalidAction(str(e)) from e
            if spec.depth > max(state.max_draft_len, 0):
                raise InvalidAction(f"tree depth must be in [0, {state.max_draft_len}], got {spec.depth}")
        if isinstance(plan.tree, Mapping) and not set(plan.tree) <= running:
            raise InvalidAction(f"tree names requests that are not running: {sorted(set(plan.tree) - running)[:5]}")
    if plan.admit is not None and not set(plan.admit) <= waiting:
        raise InvalidAction(f"admit names requests that are not waiting: {sorted(set(plan.admit) - waiting)[:5]}")
    check_moves(plan, state.requests)
    return plan


def drop_bad_rows(plan: Any, state: ScheduleState) -> tuple[Any, int]:
    """A per-request draft length outside [0, max_draft_len] is an invalid action for that row
    alone: the row drafts 0 (the safe action) and the rest of the plan stands. Returns the plan
    and the rows that fell back (0: the plan as it was; a plan that is not a `StepPlan`, or one
    length for the batch, is left to `check_plan`)."""
    if not isinstance(plan, StepPlan) or not isinstance(plan.draft_len, Mapping):
        return plan, 0
    top = max(state.max_draft_len, 0)

    def valid(k: Any) -> bool:
        return isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= top

    bad = sum(not valid(k) for k in plan.draft_len.values())
    if not bad:
        return plan, 0
    return replace(plan, draft_len={r: k if valid(k) else 0 for r, k in plan.draft_len.items()}), bad


def check_moves(plan: StepPlan, requests: Sequence[RequestView]) -> None:
    """Raise `InvalidAction` unless `plan`'s preempt and offload name running requests and its
    restore offloaded ones, each request at most once."""
    status = {r.request_id: r.status for r in requests}
    named: list[str] = []
    for field_name, allowed in (("preempt", "running"), ("offload", "running"), ("restore", "offloaded")):
        ids = getattr(plan, field_name)
        if isinstance(ids, str) or not all(isinstance(r, str) for r in ids):
            raise InvalidAction(f"{field_name} must be a sequence of request ids, got {ids!r}")
        wrong = [r for r in ids if status.get(r) != allowed]
        if wrong:
            raise InvalidAction(f"{field_name} names requests that are not {allowed}: "
                                f"{[(r, status.get(r, 'unknown')) for r in wrong[:5]]}")  # fmt: skip
        named += ids
    if len(set(named)) < len(named):
        raise InvalidAction("preempt, offload and restore name a request more than once")


def check_verify_len(lengths: Any, drafts: DraftBatch) -> torch.Tensor:
    """`lengths` as a [B] long tensor if each is in [0, draft_len], else raise `InvalidAction`."""
    try:
        cut = torch.as_tensor(lengths)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InvalidAction(f"verify lengths must be [B] integers, got {type(lengths).__name__}") from e
    b = len(drafts.request_ids)
    if cut.shape != (b,) or cut.is_floating_point() or cut.dtype == torch.bool:
        raise InvalidAction(f"verify lengths must be {b} integers, got shape {tuple(cut.shape)} of {cut.dtype}")
    cut = cut.long().cpu()
    if bool((cut < 0).any()) or bool((cut > drafts.draft_len).any()):
        raise InvalidAction("each verify length must be in [0, that row's draft_len]")
    return cut
