"""Engine traces that the estimators are fitted and judged on.

`TraceRecorder` rides along in a `ControlLoop` (pass it in `estimators=`): at every step it
keeps, per observed draft position, the features each acceptance predictor reads and the
label (see `features.acceptance_labels`), and per step the step's shape and its prefill,
draft and verify seconds. It keeps no distributions, so long traces stay small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from adactl.interface import StepRecord

from .features import RecentAcceptance, acceptance_labels, companion_features, draft_features
from .step_time import StepShape


@dataclass
class AcceptanceRows:
    """One row per observed draft position, in step order."""

    draft_x: torch.Tensor  # [N, len(DRAFT_FEATURES)]
    companion_x: torch.Tensor | None  # [N, len(COMPANION_FEATURES)] or None without a companion
    label: torch.Tensor  # [N] float 1 = accepted
    position: torch.Tensor  # [N] long draft position (from 0)
    greedy: torch.Tensor  # [N] bool the row decoded greedily
    step: torch.Tensor  # [N] long index of the step in the trace
    group: torch.Tensor  # [N] long the request's group (e.g. prompt index), for held-out splits

    def select(self, mask: torch.Tensor) -> AcceptanceRows:
        cx = self.companion_x[mask] if self.companion_x is not None else None
        return AcceptanceRows(
            self.draft_x[mask], cx, self.label[mask], self.position[mask], self.greedy[mask], self.step[mask],
            self.group[mask],
        )  # fmt: skip


@dataclass
class TraceRecorder:
    """Collects `AcceptanceRows` and step profiles from a running loop."""

    group_of: dict[str, int] = field(default_factory=dict)  # request id -> group (default 0)
    recent: RecentAcceptance = field(default_factory=RecentAcceptance)
    steps: int = 0
    _rows: list[tuple[torch.Tensor | None, ...]] = field(default_factory=list)
    shapes: list[StepShape] = field(default_factory=list)
    seconds: list[tuple[float, float, float]] = field(default_factory=list)  # prefill, draft, verify

    name = "trace"

    def estimate(self, state: object) -> None:
        return None

    def update(self, record: StepRecord) -> None:
        self.shapes.append(StepShape.of(record))
        o = record.outcome
        self.seconds.append((o.prefill_s, o.draft_s, o.verify_s))
        observed, label = acceptance_labels(record)
        if bool(observed.any()):
            d = record.drafts
            recent = self.recent(d.request_ids)  # as an online predictor saw it at this step
            dx = draft_features(d, recent)[observed]
            cx = companion_features(d, recent)[observed] if d.companion_probs is not None else None
            rows, pos = observed.nonzero(as_tuple=True)
            groups = torch.tensor([self.group_of.get(r, 0) for r in d.request_ids], dtype=torch.long)
            n = len(rows)
            self._rows.append(
                (dx, cx, label[observed], pos, d.greedy[rows], torch.full((n,), self.steps), groups[rows])
            )
        self.recent.update(record)
        self.steps += 1

    def acceptance(self) -> AcceptanceRows:
        if not self._rows:
            raise ValueError("the trace has no verified draft positions")
        cols = list(zip(*self._rows))
        cx = torch.cat(cols[1]) if all(c is not None for c in cols[1]) else None
        return AcceptanceRows(
            torch.cat(cols[0]), cx, torch.cat(cols[2]), torch.cat(cols[3]), torch.cat(cols[4]), torch.cat(cols[5]),
            torch.cat(cols[6]),
        )  # fmt: skip

    def step_seconds(self) -> np.ndarray:
        """[S, 3] prefill, draft, verify seconds per step."""
        return np.array(self.seconds, dtype=np.float64).reshape(len(self.seconds), 3)
