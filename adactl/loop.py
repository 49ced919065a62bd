"""The control loop: one engine step at a time, with the controllers at its two decision points.

    state -> schedule controllers (a stack) -> engine.draft_step(plan)
          -> verify controller -> engine.verify(lengths) -> StepRecord -> update()

A schedule stack runs in order, each controller refining the plan the previous one left
(e.g. a streaming scheduler chooses admit/run, then a speculation controller the draft
lengths). Nothing a controller or estimator does can break a step: if one raises, or returns
an action the engine cannot run, the step runs with the safe action (no speculation, first
come first served, the default prefill budget; verify nothing) and `fallbacks` counts it.
A failing `update` is counted and skipped. No request is lost either way.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch
from tqdm import tqdm

from adactl.interface import (
    Estimator,
    InvalidAction,
    ScheduleController,
    ScheduleState,
    StepRecord,
    VerifyController,
    VerifyState,
    check_plan,
    check_verify_len,
    drop_bad_rows,
)
from adactl.runtime.types import DraftBatch, RequestError, RequestResult, RequestView, StepOutcome, StepPlan

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """What the loop needs from a server (our `adactl.runtime.Engine` has it)."""

    def requests(self) -> list[RequestView]: ...

    def draft_step(self, plan: StepPlan | None = None) -> DraftBatch: ...

    def verify(self, verify_len: Sequence[int] | torch.Tensor | None = None) -> StepOutcome: ...

    def has_unfinished(self) -> bool: ...

    def pop_finished(self) -> list[RequestResult]: ...


def _estimator(controller: Any) -> Estimator | None:
    """A controller's estimator; None if it has none (the attribute is optional)."""
    return getattr(controller, "estimator", None)


def _name(obj: Any) -> str:
    return str(getattr(obj, "name", type(obj).__name__))


class ControlLoop:
    """Runs `engine` with a stack of schedule controllers and one verify controller."""

    def __init__(
        self,
        engine: EngineLike,
        schedule: ScheduleController | Sequence[ScheduleController] = (),
        verify: VerifyController | None = None,
        estimators: Iterable[Estimator] = (),
        max_draft_len: int | None = None,
        prefill_budget: int = 512,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """estimators: extra estimators to update every step (controllers' own are updated
        anyway, and so are their step-cost models, `controller.step_time`, where they learn).
        max_draft_len: None = 8 if the engine has a draft model, else 0."""
        self.engine = engine
        self.schedule = [schedule] if hasattr(schedule, "act") else list(schedule)  # type: ignore[arg-type]
        self.verify_controller = verify
        if max_draft_len is None:
            max_draft_len = 8 if getattr(engine, "draft", None) is not None else 0
        self.max_draft_len = max_draft_len
        self.safe_plan = StepPlan(draft_len=0, prefill_budget=prefill_budget)
        self.clock = clock
        owned = [_estimator(c) for c in [*self.schedule, verify]]
        self.estimators: list[Estimator] = []
        for e in [*owned, *estimators]:
            if e is not None and all(e is not seen for seen in self.estimators):
                self.estimators.append(e)
        # step-cost models that learn online (adactl.estimators.step_cost): each updated once a
        # step, however many controllers share it
        self.cost_models: list[Any] = []
        for c in [*self.schedule, verify]:
            model = getattr(c, "step_time", None)
            if hasattr(model, "update") and all(model is not seen for seen in [*self.cost_models, *self.estimators]):
                self.cost_models.append(model)
        self.fallbacks: Counter[str] = Counter()
        self.steps = 0
        self.results: dict[str, RequestResult] = {}

    # ------------------------------------------------------------------ step
    def step(self) -> StepRecord:
        """One engine step with every decision made by the controllers (or the safe action)."""
        fell_back: list[str] = []
        state = ScheduleState(
            now=self.clock(),
            requests=tuple(self.engine.requests()),
            max_draft_len=self.max_draft_len,
            plan=self.safe_plan,
            step=self.steps,
            kv=self.engine.kv_state() if hasattr(self.engine, "kv_state") else None,
            max_batch=getattr(self.engine, "max_batch_size", None),
        )
        t0 = self.clock()
        plan = self._schedule(state, fell_back)
        control_s = self.clock() - t0
        try:
            drafts = self.engine.draft_step(plan)
        except RequestError as e:  # the engine refused the plan before changing anything
            self._fall_back(fell_back, "schedule:engine", e)
            plan = self.safe_plan
            drafts = self.engine.draft_step(plan)
        t0 = self.clock()
        cut = self._verify(drafts, state, fell_back)
        control_s += self.clock() - t0
        try:
            outcome = self.engine.verify(cut)
        except RequestError as e:
            self._fall_back(fell_back, "verify:engine", e)
            cut = torch.zeros_like(drafts.draft_len)
            outcome = self.engine.verify(cut)
        record = StepRecord(state, plan, drafts, cut, outcome, tuple(fell_back), control_s)
        for learner in [*self.cost_models, *self.estimators, *self.schedule, self.verify_controller]:
            if learner is None or not hasattr(learner, "update"):
                continue
            try:
                learner.update(record)
            except Exception as e:  # noqa: BLE001 - a learner's bug must not stop serving
                self._fall_back(None, f"update:{_name(learner)}", e)
        self.results.update({r.request_id: r for r in self.engine.pop_finished()})
        self.steps += 1
        return record

    def _schedule(self, state: ScheduleState, fell_back: list[str]) -> StepPlan:
        plan = self.safe_plan
        for controller in self.schedule:
            try:
                here = replace(state, plan=plan)
                estimator = _estimator(controller)
                utilities = estimator.estimate(here) if estimator is not None else None
                before = getattr(controller, "fallback_rows", 0)  # rows it gave the safe action itself
                plan, rows = drop_bad_rows(controller.act(here, utilities), state)
                if rows:  # an invalid action for those rows alone: they draft 0, the rest stands
                    self._fall_back(
                        fell_back,
                        f"schedule:{_name(controller)}:rows",
                        InvalidAction(f"{rows} per-request draft lengths outside [0, {state.max_draft_len}]"),
                        count=rows,
                    )
                own = getattr(controller, "fallback_rows", 0) - before
                if own > 0:  # e.g. a row whose estimate was missing or NaN: counted with the rest
                    self._fall_back(fell_back, f"schedule:{_name(controller)}:rows",
                                    ValueError(f"{own} rows without a usable estimate"), count=own)  # fmt: skip
                plan = check_plan(plan, state)
            except Exception as e:  # noqa: BLE001 - any failure means: run this step safely
                self._fall_back(fell_back, f"schedule:{_name(controller)}", e)
                return self.safe_plan
        return plan

    def _verify(self, drafts: DraftBatch, schedule: ScheduleState, fell_back: list[str]) -> torch.Tensor:
        controller = self.verify_controller
        if controller is None or int(drafts.draft_len.sum()) == 0:
            return drafts.draft_len.clone()
        state = VerifyState(self.clock(), drafts, schedule.requests, schedule.step)
        try:
            estimator = _estimator(controller)
            utilities = estimator.estimate(state) if estimator is not None else None
            return check_verify_len(controller.act(state, utilities), drafts)
        except Exception as e:  # noqa: BLE001
            self._fall_back(fell_back, f"verify:{_name(controller)}", e)
            return torch.zeros_like(drafts.draft_len)

    def _fall_back(self, fell_back: list[str] | None, what: str, error: BaseException, count: int = 1) -> None:
        self.fallbacks[what] += count
        if fell_back is not None:
            fell_back.append(what)
        if self.fallbacks[what] == 1:  # say it once per kind, not every step
            log.warning("%s failed (%s: %s); safe action used", what, type(error).__name__, error)

    def pop_results(self) -> dict[str, RequestResult]:
        """Requests finished since the last call (a long-running server calls this after each
        step, so `results` does not grow without bound); cancelled ones included."""
        self.results.update({r.request_id: r for r in self.engine.pop_finished()})
        done, self.results = self.results, {}
        return done

    # ------------------------------------------------------------------- run
    def run(
        self, max_steps: int = 1_000_000, progress: bool = False, on_step: Callable[[StepRecord], None] | None = None
    ) -> dict[str, RequestResult]:
        """Step until every request has finished (or `max_steps`); results by request id."""
        bar = tqdm(desc="steps", unit="step", disable=not progress)
        for _ in range(max_steps):
            if not self.engine.has_unfinished():
                break
            record = self.step()
            if on_step is not None:
                on_step(record)
            bar.update(1)
        bar.close()
        return dict(self.results)
