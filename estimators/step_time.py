"""Step-time model: the engine's wall time for one step, predicted from the step's shape.

Scikit-learn's `ExtraTreesRegressor` (as the adaptive-allocation poster does), multi-output:
prefill, draft and verify seconds separately (the verify decision needs the verify part
alone; the schedule decision the sum). Trees fit a staircase, which is what step cost is in
tokens per step, so controllers search candidate shapes globally with `predict`. Fitted on
profiles that `python train/profile_steps.py` records (batch 1-64, draft lengths 0-8); saved with
skops, loaded trusting nothing beyond scikit-learn's tree type.

`TokensPerStep` is the companion table: mean tokens emitted per step (1 + accepted) by
draft length, from verify outcomes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import astuple, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from adactl.interface import StepRecord
from adactl.runtime.shapes import StepShape

TRUSTED = ["sklearn.tree._tree.Tree"]
PARTS = ("prefill_s", "draft_s", "verify_s")


@functools.cache
def shipped_step_time(name: str = "step_time") -> CachedStepTime:
    """A step-time model shipped in models/estimators (`step_time`: the default pair;
    `step_time_plain`: the target alone), loaded once."""
    from adactl.runtime.models import SHIPPED_MODELS

    return CachedStepTime(StepTimeModel.load(SHIPPED_MODELS / "estimators" / f"{name}.skops"))


def tiny_step_time() -> StepTimeModel:
    """A step-time model for smoke runs and tests: fitted on a linear cost of the step's shape."""
    shapes = [StepShape(b, b * (k + 1), k + 1, b * k, k, 0, 50 * b) for b in (1, 2, 4, 8, 16, 32, 64) for k in range(9)]
    y = np.array([[0.0, 0.001 * s.max_draft, 0.002 + 0.0005 * s.verify_tokens] for s in shapes])
    return StepTimeModel(n_estimators=10).fit(shapes, y)


# the trees' features: StepShape's fields up to verify_computed (the shipped models were fitted on these)
TREE_FEATURES = StepShape.names().index("verify_computed") + 1


def shape_matrix(shapes: list[StepShape]) -> np.ndarray:
    return np.array([astuple(s)[:TREE_FEATURES] for s in shapes], dtype=np.float64).reshape(len(shapes), TREE_FEATURES)


class StepTimePredictor(Protocol):
    """What controllers need of a step-time model: seconds for each candidate shape."""

    def predict(self, shapes: list[StepShape]) -> np.ndarray: ...


class StepTimeModel:
    """ExtraTrees over `StepShape` -> (prefill, draft, verify) seconds.

    The trees fit log(seconds + 1 ms): a CPU step's time is noisy with a long upper tail (a
    cache reallocation, the OS), and averaging logs in a leaf keeps one slow step from
    pulling its neighbours up (held-out MAPE 11% against 13% on the same profile)."""

    OFFSET = 1e-3

    def __init__(self, n_estimators: int = 60, min_samples_leaf: int = 3, seed: int = 0) -> None:
        from sklearn.ensemble import ExtraTreesRegressor

        self.trees = ExtraTreesRegressor(
            n_estimators=n_estimators, min_samples_leaf=min_samples_leaf, random_state=seed, n_jobs=1
        )
        self.fitted = False

    def fit(self, shapes: list[StepShape], seconds: np.ndarray) -> StepTimeModel:
        """seconds: [N, 3] prefill, draft, verify wall seconds per step."""
        self.trees.fit(shape_matrix(shapes), np.log(np.asarray(seconds, dtype=np.float64) + self.OFFSET))
        self.fitted = True
        return self

    def predict_parts(self, shapes: list[StepShape]) -> np.ndarray:
        """[N, 3] predicted prefill, draft and verify seconds."""
        if not self.fitted:
            raise RuntimeError("the step-time model is not fitted: run python train/fit_estimators.py")
        log_s = np.asarray(self.trees.predict(shape_matrix(shapes))).reshape(len(shapes), len(PARTS))
        return np.maximum(np.exp(log_s) - self.OFFSET, 0.0)

    def predict(self, shapes: list[StepShape]) -> np.ndarray:
        """[N] predicted step seconds."""
        return self.predict_parts(shapes).sum(1)

    def save(self, path: str | Path) -> None:
        import skops.io as sio

        sio.dump(self.trees, path)

    @classmethod
    def load(cls, path: str | Path) -> StepTimeModel:
        import skops.io as sio

        model = cls()
        model.trees = sio.load(path, trusted=TRUSTED)
        model.fitted = True
        return model


class CachedStepTime:
    """A step-time predictor that predicts each shape once.

    One `predict` of the trees costs milliseconds, a real share of a small batch's step, and a
    controller asks every step about shapes it has mostly seen: shapes are keyed with the
    context rounded to `context_step` tokens and remembered (up to `max_entries`)."""

    def __init__(self, model: StepTimePredictor, context_step: int = 256, max_entries: int = 200_000) -> None:
        self.model, self.context_step, self.max_entries = model, context_step, max_entries
        self.cache: dict[StepShape, float] = {}

    def predict(self, shapes: list[StepShape]) -> np.ndarray:
        step = self.context_step
        keys = [replace(s, context_tokens=int(round(s.context_tokens / step)) * step) for s in shapes]
        missing = [k for k in dict.fromkeys(keys) if k not in self.cache]
        if missing:
            if len(self.cache) + len(missing) > self.max_entries:
                self.cache.clear()
            self.cache.update(zip(missing, (float(x) for x in self.model.predict(missing))))
        return np.array([self.cache[k] for k in keys])


def mape(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute percentage error."""
    return float(np.mean(np.abs(pred - true) / np.maximum(true, 1e-9)))


class TokensPerStep:
    """Mean tokens a row emits per step (accepted + 1) by draft length k, from outcomes."""

    def __init__(self, max_len: int = 16) -> None:
        self.total = torch.zeros(max_len + 1, dtype=torch.float64)
        self.count = torch.zeros(max_len + 1, dtype=torch.float64)

    def update(self, record: StepRecord) -> None:
        k = record.verify_len.long().clamp(max=len(self.total) - 1)
        self.total.index_add_(0, k, record.outcome.accepted.double() + 1)
        self.count.index_add_(0, k, torch.ones_like(k, dtype=torch.float64))

    @classmethod
    def from_alpha(cls, alpha: list[float]) -> TokensPerStep:
        """The table implied by conditional acceptance per position (alpha_0, alpha_1, ...):
        tokens(k) = 1 + sum_{j < k} prod_{i <= j} alpha_i."""
        table = cls(len(alpha))
        survival = torch.cumprod(torch.tensor(alpha, dtype=torch.float64), 0)
        table.total = torch.cat([torch.ones(1, dtype=torch.float64), 1 + survival.cumsum(0)])
        table.count = torch.ones(len(alpha) + 1, dtype=torch.float64)
        return table

    def mean(self) -> torch.Tensor:
        """[max_len + 1] mean tokens per step at each verified length (nan where unseen)."""
        return self.total / self.count

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total.tolist(), "count": self.count.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokensPerStep:
        t = cls(len(d["total"]) - 1)
        t.total, t.count = torch.tensor(d["total"], dtype=torch.float64), torch.tensor(d["count"], dtype=torch.float64)
        return t

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")
