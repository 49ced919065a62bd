"""Online logistic regression on draft-logit features (as vLLM's adaptive verification does).

alpha_j = sigmoid(w . standardise(x_j) + b), with x_j = own-token probability, its log,
the entropy of the draft distribution, the top-1/top-2 margin, the position j and the
request's recent acceptance (`features.DRAFT_FEATURES`). Greedy and sampled rows get a
model each (`ByMode`): argmax agreement and the rejection rule relate to the draft's
probabilities differently (with sampling, a token the draft over-rates is *less* likely to
pass). Fitted offline on engine traces (train/fit_estimators.py) and then updated from every
verify outcome while serving: one AdaGrad step on the step's observed positions.

`LogisticModel` is the plain model and `ByMode` the pair, shared with the companion signal.
"""

from __future__ import annotations

from typing import Any

import torch

from adactl.interface import StepRecord
from adactl.runtime.types import DraftBatch

from .base import AcceptancePredictor
from .features import DRAFT_FEATURES, RecentAcceptance, acceptance_labels, draft_features


class LogisticModel:
    """p(y = 1 | x) = sigmoid(w . (x - mu) / sigma + b); full-batch L-BFGS fit, AdaGrad updates."""

    def __init__(self, n_features: int, l2: float = 1e-3, lr: float = 0.05) -> None:
        self.w = torch.zeros(n_features, dtype=torch.float64)
        self.b = torch.zeros((), dtype=torch.float64)
        self.mu = torch.zeros(n_features, dtype=torch.float64)
        self.sigma = torch.ones(n_features, dtype=torch.float64)
        self.l2, self.lr = l2, lr
        self._g2 = torch.full((n_features + 1,), 1e-8, dtype=torch.float64)  # AdaGrad accumulators

    def _z(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mu) / self.sigma

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """[..., F] -> [...] probabilities."""
        return torch.sigmoid(self._z(x) @ self.w + self.b).float()

    def fit(self, x: torch.Tensor, y: torch.Tensor, max_iter: int = 200) -> LogisticModel:
        """x [N, F], y [N] in {0, 1}: standardise, then minimise the L2-regularised log loss."""
        x, y = x.double(), y.double()
        self.mu, self.sigma = x.mean(0), x.std(0).clamp(min=1e-6)
        z = self._z(x)
        w = torch.zeros(z.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logits = z @ w[:-1] + w[-1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + self.l2 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w, self.b = w[:-1].detach().clone(), w[-1].detach().clone()
        return self

    def partial_fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One AdaGrad step on the mean log loss of (x [N, F], y [N])."""
        if len(y) == 0:
            return
        z = self._z(x)
        err = torch.sigmoid(z @ self.w + self.b) - y.double()  # [N]
        grad = torch.cat([(z * err[:, None]).mean(0) + 2 * self.l2 * self.w, err.mean()[None]])
        self._g2 += grad**2
        step = self.lr * grad / self._g2.sqrt()
        self.w -= step[:-1]
        self.b -= step[-1]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).tolist() for k in ("w", "b", "mu", "sigma")} | {"l2": self.l2, "lr": self.lr}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LogisticModel:
        m = cls(len(d["w"]), d["l2"], d["lr"])
        for k in ("w", "b", "mu", "sigma"):
            setattr(m, k, torch.tensor(d[k], dtype=torch.float64))
        return m


class ByMode:
    """A `LogisticModel` for greedy rows and one for sampled rows."""

    def __init__(self, n_features: int, greedy: LogisticModel | None = None, sampled: LogisticModel | None = None):
        self.greedy = greedy or LogisticModel(n_features)
        self.sampled = sampled or LogisticModel(n_features)

    def predict(self, x: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
        """x [..., F] with greedy [...] (broadcast from rows) -> [...] probabilities."""
        g = greedy.expand(x.shape[:-1])
        return torch.where(g, self.greedy.predict(x), self.sampled.predict(x))

    def fit(self, x: torch.Tensor, y: torch.Tensor, greedy: torch.Tensor) -> ByMode:
        for model, m in ((self.greedy, greedy), (self.sampled, ~greedy)):
            if int(m.sum()) >= 2 and 0 < float(y[m].mean()) < 1:
                model.fit(x[m], y[m])
        return self

    def partial_fit(self, x: torch.Tensor, y: torch.Tensor, greedy: torch.Tensor) -> None:
        self.greedy.partial_fit(x[greedy], y[greedy])
        self.sampled.partial_fit(x[~greedy], y[~greedy])

    def learn(self, record: StepRecord, inputs: torch.Tensor) -> None:
        """One update from a step's verify outcomes; inputs [B, K, F] as the estimate saw them."""
        observed, label = acceptance_labels(record)
        if bool(observed.any()):
            greedy = record.drafts.greedy[:, None].expand_as(observed)[observed]
            self.partial_fit(inputs[observed], label[observed], greedy)

    def to_dict(self) -> dict[str, Any]:
        return {"greedy": self.greedy.to_dict(), "sampled": self.sampled.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ByMode:
        g, s = LogisticModel.from_dict(d["greedy"]), LogisticModel.from_dict(d["sampled"])
        return cls(len(g.w), g, s)


class OnlineLogistic(AcceptancePredictor):
    name = "logistic"
    features = DRAFT_FEATURES

    def __init__(self, model: ByMode | None = None, online: bool = True) -> None:
        self.model = model or ByMode(len(self.features))
        self.online = online
        self.recent = RecentAcceptance()

    def inputs(self, drafts: DraftBatch) -> torch.Tensor:
        return draft_features(drafts, self.recent(drafts.request_ids))

    def predict(self, drafts: DraftBatch) -> torch.Tensor:
        return self.model.predict(self.inputs(drafts), drafts.greedy[:, None])

    def update(self, record: StepRecord) -> None:
        if self.online:
            self.model.learn(record, self.inputs(record.drafts))
        self.recent.update(record)  # after: the features above are those the estimate saw

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "online": self.online}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnlineLogistic:
        return cls(ByMode.from_dict(d["model"]), d.get("online", True))
