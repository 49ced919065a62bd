"""Calibration maps and the scores a probability forecast is judged by.

- `IsotonicMap`: a monotone map from a raw score to a probability (scikit-learn's isotonic
  regression, stored as its breakpoints in JSON);
- `auc`, `brier`, `expected_calibration_error` (equal-width bins, weighted by count),
  `reliability` (per-bin mean forecast and frequency) and `reliability_plot` (PNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


class IsotonicMap:
    """Monotone (non-decreasing) map fitted by isotonic regression; JSON round trip."""

    def __init__(self, x: Sequence[float], y: Sequence[float]) -> None:
        self.x = np.asarray(x, dtype=np.float64)
        self.y = np.asarray(y, dtype=np.float64)

    @classmethod
    def fit(cls, scores: Any, labels: Any) -> IsotonicMap:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(_np(scores), _np(labels))
        return cls(iso.X_thresholds_, iso.y_thresholds_)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        out = np.interp(scores.detach().cpu().numpy().astype(np.float64), self.x, self.y)
        return torch.from_numpy(out).to(torch.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"x": self.x.tolist(), "y": self.y.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IsotonicMap:
        return cls(d["x"], d["y"])


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (ties count half); nan if only one class is present."""
    s, y = _np(scores).astype(np.float64), _np(labels).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def brier(probs: Any, labels: Any) -> float:
    p, y = _np(probs).astype(np.float64), _np(labels).astype(np.float64)
    return float(np.mean((p - y) ** 2))


def reliability(probs: Any, labels: Any, bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width bin: count, mean forecast, observed frequency."""
    p, y = _np(probs).astype(np.float64), _np(labels).astype(np.float64)
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        if m.any():
            row = {"bin": b, "count": int(m.sum()), "forecast": float(p[m].mean()), "observed": float(y[m].mean())}
            out.append(row)
    return out


def expected_calibration_error(probs: Any, labels: Any, bins: int = 10) -> float:
    rows = reliability(probs, labels, bins)
    n = sum(r["count"] for r in rows)
    return float(sum(r["count"] * abs(r["forecast"] - r["observed"]) for r in rows) / max(n, 1))


def reliability_plot(curves: dict[str, tuple[Any, Any]], path: str | Path, title: str, bins: int = 10) -> None:
    """One reliability diagram (forecast vs observed frequency) with a curve per predictor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect")
    for name, (probs, labels) in curves.items():
        rows = reliability(probs, labels, bins)
        ece = expected_calibration_error(probs, labels, bins)
        xs, ys = [r["forecast"] for r in rows], [r["observed"] for r in rows]
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
