"""adactl.estimators: utilities the controllers act on.

- acceptance predictors (conditional acceptance alpha per row and draft position):
  `DraftConfidence`, `OnlineLogistic`, `CompanionSignal`, `MovingAverage`, and per request
  before drafting `RequestAcceptance`;
- `StepTimeModel` (ExtraTrees over the step's shape) and `TokensPerStep`;
- deadline risk of streaming requests: `AnalyticRisk`, `LearnedRisk`;
- `calibration`: isotonic maps and the scores (AUC, Brier, ECE, reliability diagrams).

Everything saves as JSON (skops for the trees) and loads with `load_acceptance` or the
classes' own `load`/`from_dict`; train/fit_estimators.py fits them all on engine traces.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import AcceptancePredictor
from .calibration import IsotonicMap, auc, brier, expected_calibration_error, reliability
from .companion import CompanionSignal
from .confidence import DraftConfidence
from .deadline_risk import AnalyticRisk, LearnedRisk, StreamState
from .features import acceptance_labels, companion_features, draft_features
from .logistic import ByMode, LogisticModel, OnlineLogistic
from .moving_average import MovingAverage
from .request_acceptance import RequestAcceptance
from .step_time import CachedStepTime, StepShape, StepTimeModel, TokensPerStep

ACCEPTANCE = {c.name: c for c in (DraftConfidence, OnlineLogistic, CompanionSignal, MovingAverage, RequestAcceptance)}


def load_acceptance(path: str | Path) -> AcceptancePredictor:
    """An acceptance predictor saved with `.save(path)` (JSON with its kind), or the name of
    one fitted for the default models and shipped in models/estimators/ (`confidence`,
    `logistic`, `companion`, `moving_average`)."""
    from adactl.runtime.models import SHIPPED_MODELS

    file = Path(path)
    if str(path) in ACCEPTANCE and not file.exists():
        file = SHIPPED_MODELS / "estimators" / f"{path}.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: run python train/fit_estimators.py")
    d = json.loads(file.read_text())
    kind = d.pop("kind", None)
    if kind not in ACCEPTANCE:
        raise ValueError(f"{path}: unknown acceptance predictor kind {kind!r} (known: {sorted(ACCEPTANCE)})")
    return ACCEPTANCE[kind].from_dict(d)  # type: ignore[attr-defined,no-any-return]


__all__ = [
    "ACCEPTANCE",
    "AcceptancePredictor",
    "AnalyticRisk",
    "ByMode",
    "CachedStepTime",
    "CompanionSignal",
    "DraftConfidence",
    "IsotonicMap",
    "LearnedRisk",
    "LogisticModel",
    "MovingAverage",
    "OnlineLogistic",
    "RequestAcceptance",
    "StepShape",
    "StepTimeModel",
    "StreamState",
    "TokensPerStep",
    "acceptance_labels",
    "auc",
    "brier",
    "companion_features",
    "draft_features",
    "expected_calibration_error",
    "load_acceptance",
    "reliability",
]
