"""Learned controllers: a PPO policy (train/ppo.py) deployed through the controller protocol.

A policy file is safetensors, loaded with `safetensors.torch.load_file` (no unpickling):

    policy.{i}.weight, policy.{i}.bias   the actor MLP (tanh after each layer)
    action.weight, action.bias           the action logits
    obs_mean, obs_var                    observation normalisation (VecNormalize statistics)
    metadata: format = "adactl-policy-v1", env_id, action_space (JSON: Discrete n or
              MultiDiscrete nvec), obs_dim, clip_obs, epsilon, env_kwargs (JSON)

The controller computes the observation the environment would show (the same feature
functions, `adactl.controllers.observations`), normalises it, and takes the most likely action of each
sub-space (deterministic). A missing, corrupt or mis-shaped file fails at load time with a
`PolicyError` that says which. A non-finite output at run time falls back to the safe action
(no speculation; ProgressServe's defaults for streaming) and is counted in `nonfinite`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adactl.estimators.step_time import shipped_step_time
from adactl.interface import Controller, ScheduleState, StepRecord
from adactl.runtime.types import StepPlan

from .observations import DEFAULT_ACTION, RowFeatures, SpecFeatures, StreamFeatures, apply_action, row_actions
from .prefill_budget import TTFTPrefillBudget
from .progressserve import ProgressServe

FORMAT = "adactl-policy-v1"


class PolicyError(ValueError):
    """A policy file that cannot be served: missing, corrupt, or of the wrong shape."""


class Policy:
    """The actor of a saved policy: obs [D] -> action (an int, or [n] ints for MultiDiscrete)."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        if meta.get("format") != FORMAT:
            raise PolicyError(f"not an adactl policy (format {meta.get('format')!r}, expected {FORMAT!r})")
        try:
            self.env_id = meta["env_id"]
            self.space = json.loads(meta["action_space"])
            self.obs_dim = int(meta["obs_dim"])
            self.clip_obs, self.epsilon = float(meta["clip_obs"]), float(meta["epsilon"])
            self.env_kwargs = json.loads(meta.get("env_kwargs", "{}"))
        except (KeyError, ValueError) as e:
            raise PolicyError(f"policy metadata is incomplete or malformed: {e}") from e
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        i = 0
        while f"policy.{i}.weight" in tensors:
            self.layers.append((tensors[f"policy.{i}.weight"].float(), tensors[f"policy.{i}.bias"].float()))
            i += 1
        try:
            self.action = (tensors["action.weight"].float(), tensors["action.bias"].float())
            self.obs_mean, self.obs_var = tensors["obs_mean"].double(), tensors["obs_var"].double()
        except KeyError as e:
            raise PolicyError(f"policy file lacks tensor {e}") from e
        self.sizes = (
            [int(self.space["n"])] if self.space["type"] == "Discrete" else [int(n) for n in self.space["nvec"]]
        )
        self._check_shapes()

    def _check_shapes(self) -> None:
        width = self.obs_dim
        if tuple(self.obs_mean.shape) != (width,) or tuple(self.obs_var.shape) != (width,):
            raise PolicyError(f"normalisation statistics have shape {tuple(self.obs_mean.shape)}, expected ({width},)")
        for i, (w, b) in enumerate([*self.layers, self.action]):
            if w.ndim != 2 or w.shape[1] != width or tuple(b.shape) != (w.shape[0],):
                raise PolicyError(f"layer {i} has weight {tuple(w.shape)} and bias {tuple(b.shape)}; "
                                  f"its input should be {width} wide")  # fmt: skip
            width = w.shape[0]
        if width != sum(self.sizes):
            raise PolicyError(f"the policy outputs {width} logits; the action space needs {sum(self.sizes)}")

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"no policy file at {path}: train one with python train/ppo.py")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise PolicyError(f"{path} is not a readable safetensors policy: {e}") from e
        return cls(tensors, meta)

    def logits(self, obs: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(obs, dtype=np.float64)).reshape(-1)
        if x.shape[0] != self.obs_dim:
            raise PolicyError(f"observation has {x.shape[0]} features, the policy expects {self.obs_dim}")
        x = ((x - self.obs_mean) / torch.sqrt(self.obs_var + self.epsilon)).clamp(-self.clip_obs, self.clip_obs)
        h = x.float()
        for w, b in self.layers:
            h = torch.tanh(h @ w.T + b)
        return h @ self.action[0].T + self.action[1]

    def act(self, obs: np.ndarray | torch.Tensor) -> int | np.ndarray | None:
        """The most likely action, or None if the output is not finite."""
        logits = self.logits(obs)
        if not bool(torch.isfinite(logits).all()):
            return None
        parts = torch.split(logits, self.sizes)
        if self.space["type"] == "Discrete":
            return int(parts[0].argmax())
        return np.asarray([int(p.argmax()) for p in parts], dtype=np.int64)


def _shipped_or_fresh_estimator() -> Any:
    from adactl.estimators import MovingAverage, load_acceptance

    try:
        return load_acceptance("moving_average")
    except FileNotFoundError:
        return MovingAverage()


class LearnedController(Controller):
    """Loads a policy trained on `adactl/SpecDecode-v0` (acts: the batch's draft length, or with
    `per_row` a cap and a threshold on each request's own acceptance estimate, so a draft
    length per request) or `adactl/Streaming-v0` (acts: ProgressServe's admission threshold,
    deferral margin and in-flight cap)."""

    name = "learned"

    def __init__(self, path: str | Path, step_time: Any = None) -> None:
        self.policy = Policy.load(path)
        kwargs = self.policy.env_kwargs
        if step_time is None:
            step_time = shipped_step_time("step_time_plain" if self.policy.env_id.endswith("Streaming-v0") else
                                          "step_time")  # fmt: skip
        self.step_time = step_time
        self.nonfinite = 0  # steps whose policy output was not finite (the safe action ran)
        self.last_action: Any = None
        if self.policy.env_id == "adactl/SpecDecode-v0":
            self.max_draft_len = int(kwargs.get("max_draft_len", 4))
            self.per_row = bool(kwargs.get("per_row", False))
            # the features own their acceptance estimators and update them in `update` (they are
            # not exposed as `self.estimator`, which the loop would update a second time)
            features = RowFeatures if self.per_row else SpecFeatures
            self.features: Any = features(self.max_draft_len, step_time, _shipped_or_fresh_estimator())
            actions = row_actions(self.max_draft_len) if self.per_row else self.max_draft_len + 1
            if self.policy.sizes != [actions]:
                kind = " per row" if self.per_row else ""
                raise PolicyError(f"the policy has {self.policy.sizes} actions; SpecDecode-v0 with max_draft_len "
                                  f"{self.max_draft_len}{kind} has {actions}")  # fmt: skip
            expected = self.features.size
        elif self.policy.env_id == "adactl/Streaming-v0":
            self.features = StreamFeatures(step_time)
            self.ps = ProgressServe(step_time)
            self.budget = TTFTPrefillBudget(step_time)
            expected = self.features.size
        else:
            raise PolicyError(f"no controller for policies of {self.policy.env_id!r}")
        if expected != self.policy.obs_dim:
            raise PolicyError(f"the policy reads {self.policy.obs_dim} features; {self.policy.env_id} has {expected}")

    def act(self, state: ScheduleState, utilities: Any = None) -> StepPlan:
        obs = self.features(state)
        action = self.policy.act(obs)
        if action is None:
            self.nonfinite += 1
        self.last_action = action
        if self.policy.env_id == "adactl/SpecDecode-v0":
            from dataclasses import replace

            if self.per_row:
                lengths = self.features.lengths(state, 0 if action is None else int(action))
                run = state.plan.run
                per_request = {
                    v.request_id: min(int(c), state.max_draft_len)
                    for v, c in zip(state.running, lengths.tolist())
                    if run is None or v.request_id in run
                }
                return replace(state.plan, draft_len=per_request)
            k = 0 if action is None else min(int(action), state.max_draft_len)
            return replace(state.plan, draft_len=k)
        a: Any = DEFAULT_ACTION if action is None else action
        apply_action(self.ps, a)
        plan = self.ps.act(state)
        return self.budget.act(ScheduleState(state.now, state.requests, state.max_draft_len, plan, state.step))

    def update(self, record: StepRecord) -> None:
        self.features.update(record)
