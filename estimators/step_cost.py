"""The step-cost model of the machine in use: a profile made on it, refined online every step.

A step's wall time, per part (prefill, draft, verify), is a linear cost basis of its shape
(`BASIS`, `features`) times two correction surfaces over (rows, draft tokens verified per
row) (`adactl.estimators.cost_surface`):

    seconds[part] = theta[:, part] . phi(shape) * exp(profile(shape) + online(shape))
    (the profile's surface on the draft and verify parts only: it corrects decode shapes)
    phi = [1, rows, verify tokens computed, verify attention (computed x mean context),
           drafting at all (0 or 1), draft forwards, draft tokens, draft attention,
           prefill tokens, prefill attention (query-key pairs, summed over the step's prompts),
           KV read (the running rows' contexts, summed), prefilling at all (0 or 1),
           KV span (the rows times the longest row's context), KV moved (columns copied moving rows),
           draft catch-up (columns the draft's first forward feeds past one a drafting row)]

(The drafting indicator carries what a step pays once it drafts anything, whatever the
length: the draft's first forward, catching up on the tokens it has not read. On the 2-core
CPU it is most of a batch-1 step's cost of drafting.)

(The KV read is what a step pays for its rows' contexts however many tokens each row
verifies: the verify attention term grows with k, and without this one it had to carry
both. A profile whose rows held 500-900 tokens put a k-token step's cost over a plain one's
10.2% off on average (up to 22%) against held-out steps with shorter rows on the 2-core CPU;
its own steps refitted with this term, 7.9%; a profile of younger rows, 5.2% and 5.0%
(`adactl profile --check --check-rounds 12`, the mean of three checks, 2026-12-05). Profiles
written before this term load with its coefficient 0, pricing what they always did.)

(The KV span is what the engine's attention reads: a forward over a batch spans the widest
row's columns (`adactl.runtime.kv`: one buffer, per-row masks), so one long row prices every
row of a step as long (`runtime.shapes.context_of`). Without it a profile could only price
context through the summed KV read, and its rounds, whose batch grows by adding younger rows
(`adactl.profiler.measure`), confound the two: a profile of the 2-core CPU priced a token of
context at 12 us where the engine's plain steps paid 3 us (8 and 16 rows at 60 against 300
tokens of context), and streaming runs' decode steps, whose rows are shorter, 15% low
(issue 32). A computed GPU profile holds it at 0 (`fit_theta`'s `held`): length-aware
attention reads each row's own context. Profiles written before it load with its coefficient 0.)

(The KV moved is what the engine copies when a step's rows change segment (`Rows.arrange`:
a deferral, a new draft length; a finished row's place taken by the last): each moved row's
columns, in every layer. A scheduler that runs a different subset every step (Andes' largest
lags) pays it every step: on the 2-core CPU its decode steps at 14 rows ran 35-40% over what a
profile without it priced (issue 32). The profiler's span steps measure it
(`adactl.profiler.measure`); the replay counts the moves the engine would make
(`runtime.shapes.arrangement`). A computed GPU profile holds it at 0 (block tables move no KV).)

(The draft catch-up is what the draft's first forward feeds past one token a drafting row
(`runtime.shapes.catchup_of`): every token the row emitted since it last drafted, so a step
that drafts after a stretch of plain decoding pays for the whole stretch. A speculation
controller near the tie between plain decoding and k = 1 (batch 16 on the 2-core CPU) that
drafts now and then paid it on every drafting step: k = 1 at batch 16 after 32 plain steps
drafted for 25 ms against 9 ms, a quarter of a plain step, which the model put on k = 1
itself, and the refined surface then read k = 1 as dearer than it is
(`docs/issue30/catchup`). The profiler measures it (`adactl.profiler.measure`: a k = 1 step
after a few plain ones in every round) and the replay counts it (each row's lag). A computed
GPU profile holds it at 0. Profiles written before it load with its coefficient 0.)

(The prefilling indicator carries what a prefill forward pays whatever its size: the
engine runs a step's prompt chunks as a forward of their own, which streams the weights once.
Without it the fixed cost could only go to the per-token terms, so a fit priced small chunks
low and large ones high: the own steps of a streaming run on the 2-core CPU, prefill chunks of
16-440 tokens, took 0.06-0.20 s plus 2.6-3.8 ms a token, and the fit without the term priced a
40-token chunk at 0.6x its time and a 330-token one at 1.3x; a replay that merged arrivals into
fewer, larger chunks then paid more for them than the engine did (issue 32). Profiles written
before it load with its coefficient 0.)

- **Prior**: theta fitted by non-negative least squares, weighted by 1 / seconds (relative error), on the
  steps that `adactl profile` measured on this machine (`StepCostProfile`); then the
  profile's surface, fitted on the same steps' log residuals. The basis alone misses the
  ratio of a k-token step to a plain one by up to 20% at some batch sizes (measured on the
  2-core CPU: at batch 16 it said k = 1 costs 1.69x plain decoding, the steps 2.06x); the
  surface's cells hold what the whole-batch steps measured.
- **Online refinement**: every `StepRecord` adds its log residual to the online surface, a
  Kalman filter whose levels forget in `memory` / 4 steps (100 by default) and whose slopes
  and cells in `memory` (400). Its levels follow a machine that runs slower or faster than
  its profile (drift, a co-located job, another machine's profile) without changing any
  ratio; its slopes and cells change ratios only where whole-batch steps of different draft
  lengths at one batch size say so; where no recent step says anything, it returns to the
  profile. Recursive least squares over the
  basis, which this replaced, let a few dozen steps of one shape rewrite every other shape's
  cost (issue 30).
- **Absurd steps are not learned from**: a time that is not finite, not positive, or more
  than `rejection` (100) times off the prediction (a paused process, a clock jump) is
  counted in `rejected` and skipped.

A profile is a portable JSON file: a fingerprint of the machine and models it was measured
for (`Fingerprint`), the raw measured steps, and the fitted theta (the surface is fitted from
the steps when the profile loads). Nothing is unpickled.
Not here: measuring (adactl.profiler) or choosing which profile a run uses (adactl.profiler).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adactl.estimators.cost_surface import ONLINE, PROFILE, CostSurface
from adactl.estimators.step_time import PARTS, StepShape
from adactl.interface import StepRecord

FORMAT = "adactl-step-cost-profile"
VERSION = 1
BASIS = ("step", "rows", "verify_tokens", "verify_attention", "drafting", "draft_forwards", "draft_tokens",
         "draft_attention", "prefill_tokens", "prefill_attention", "kv_read", "prefilling", "kv_span",
         "kv_moved", "draft_catchup")  # fmt: skip
# the bases of older profiles, each a prefix of BASIS but for names (their missing terms load as 0): until the night
# of 2026-12-06 no draft catch-up; until its evening no KV span or KV moved (for an hour, a span and no moved); before
# that day no prefilling indicator; before 2026-12-05 no KV read; before 2026-12-02 the prefill attention was called
# the square of a step's prefill tokens, which is its attention when the step prefills one prompt from scratch (the
# profiler's steps lack the field, and `StepShape` gives them exactly that); the same coefficient, read for several
# prompts as their sum
OLD_BASES = (BASIS[:-1], BASIS[:-2], BASIS[:-3], BASIS[:-4], BASIS[:-5], (*BASIS[:-6], "prefill_squared"))
# how far off another machine's (or dtype's) profile may be on a k-token step's cost over a plain one's, in log:
# 2x (the shipped CPU profiles put k = 1 at batch 64, 250 tokens of context a row, at 1.47x plain decoding in fp32
# and 6.9x in bf16; at batch 16 the CPU's fp32 at 1.30x, the H100's at 1.54x)
FOREIGN_RATIO_SD = math.log(2.0)
# features are divided by these typical sizes, so that P starts well conditioned
_SCALE = np.array([1.0, 16.0, 64.0, 16.0, 1.0, 4.0, 64.0, 16.0, 256.0, 256.0, 4.0, 1.0, 4.0, 4.0, 256.0])
# the terms that grow with the tokens a step verifies or drafts (`StepCostModel.grows_with_work`)
_WORK = [BASIS.index(n) for n in ("verify_tokens", "verify_attention", "drafting", "draft_forwards", "draft_tokens",
                                  "draft_attention")]  # fmt: skip
# the parts a step's decode pays (draft, then verify: PARTS' order), which the profile's surface corrects
_DECODE = slice(PARTS.index("draft_s"), None)


class ProfileError(ValueError):
    """A profile file that is corrupt, foreign to adactl, or for another machine."""


def _phi(s: StepShape) -> tuple[float, ...]:
    """The unscaled cost basis of one shape, in the order of BASIS."""
    mean_context = s.context_tokens / max(s.rows, 1) / 1024  # thousands of tokens per row
    return (1.0, s.rows, s.verify_computed, s.verify_computed * mean_context, float(s.max_draft > 0), s.max_draft,
            s.draft_tokens, s.draft_tokens * mean_context, s.prefill_tokens, s.prefill_attention / 128,
            s.context_tokens / 1024, float(s.prefill_tokens > 0), s.span_tokens / 1024,
            s.moved_tokens / 1024, s.catchup_tokens)  # fmt: skip


def features(shapes: Sequence[StepShape]) -> np.ndarray:
    """[N, len(BASIS)] cost basis of step shapes (scaled). Plain Python per shape: a step's
    online update has 0.1 ms, and numpy's per-call overhead dominates arrays this small."""
    return np.array([_phi(s) for s in shapes], dtype=np.float64).reshape(-1, len(BASIS)) / _SCALE


@dataclass(frozen=True)
class Fingerprint:
    """What a step's cost depends on besides its shape: the models, the machine, the software."""

    target: str
    draft: str  # "none": plain decoding
    companion: str  # "none": no companion
    device_type: str  # "cpu" | "cuda" | "mps"
    device_name: str  # GPU name or CPU model
    dtype: str
    torch: str
    threads: int

    def key(self) -> str:
        """A short stable hash: the profile's file name in the cache."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, other: Fingerprint) -> list[str]:
        """`field: ours != theirs` for every field that differs."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]

    @property
    def machine_label(self) -> str:
        where = self.device_name if self.device_type != "cpu" else f"CPU {self.device_name} ({self.threads} threads)"
        return f"{where}, {self.dtype}, torch {self.torch}"


def fit_theta(shapes: Sequence[StepShape], seconds: np.ndarray, ridge: float = 1e-3,
              nonnegative: bool = True, held: Sequence[str] = ()) -> np.ndarray:  # fmt: skip
    """[len(BASIS), 3] non-negative least squares of (prefill, draft, verify) seconds on the
    basis, each step weighted by 1 / its total seconds (so a 2 ms step counts as much as a 2 s
    one), with a small ridge.

    Non-negative because every term of a measured profile is a cost: a profiler's steps vary rows and context
    together (its batch grows by adding younger, shorter rows), and unconstrained least squares
    fits that collinearity with terms that cancel (a plain profile of the 2-core CPU: -0.18 per
    row against +2.2 per unit of attention), which hold on the profile's own steps (the same
    in-sample error, 14-15%) and fail elsewhere: that profile priced a streaming run's steps,
    whose rows hold shorter contexts, 25% low; its non-negative fit, 6% (issue 32).
    `nonnegative=False` (plain least squares) is for steps computed from a model on a designed
    grid (adactl.estimators.gpu_cost), exact and not collinear, whose curvature (the linear
    layers' knee) the basis follows better with signed terms. `held`: terms of BASIS kept at 0
    (a computed profile's KV span and KV moved: its physics prices neither)."""
    from scipy.optimize import nnls

    unknown = set(held) - set(BASIS)
    if unknown:
        raise ValueError(f"held terms {sorted(unknown)} are not in the cost basis {list(BASIS)}")
    free = [i for i, name in enumerate(BASIS) if name not in held]
    phi = features(shapes)[:, free]
    y = np.asarray(seconds, dtype=np.float64).reshape(len(phi), len(PARTS))
    w = 1.0 / np.maximum(y.sum(1), 1e-4)
    k = phi.shape[1]
    theta = np.zeros((len(BASIS), len(PARTS)))
    if not nonnegative:
        a = phi * w[:, None]
        theta[free] = np.linalg.solve(a.T @ a + ridge * np.eye(k), a.T @ (y * w[:, None]))
        return theta
    a = np.vstack([phi * w[:, None], math.sqrt(ridge) * np.eye(k)])
    for j in range(len(PARTS)):
        theta[free, j] = nnls(a, np.concatenate([y[:, j] * w, np.zeros(k)]))[0]
    return theta


class StepCostModel:
    """A `StepTimePredictor` (adactl.estimators.step_time) that learns from every step.

    `predict(shapes)` and `predict_parts(shapes)` as the ExtraTrees model has them; `update(record)`
    refines the online surface (the loop calls it every step; see the module docstring).
    `refine=False` keeps the prior as it is (to compare); `frozen()` is a copy that does."""

    name = "step_cost"

    def __init__(self, theta: np.ndarray, profile: CostSurface | None = None, refine: bool = True,
                 memory: float = 400.0, rejection: float = 100.0, foreign: bool = False) -> None:  # fmt: skip
        if memory < 1 or rejection <= 1:
            raise ValueError(f"memory must be >= 1 step and rejection > 1, got {memory}, {rejection}")
        self.theta = np.array(theta, dtype=np.float64).reshape(len(BASIS), len(PARTS))
        self.profile = profile
        self.refine, self.memory, self.rejection = refine, memory, rejection
        self.foreign = foreign  # the profile was made for another machine or models (`ratio_sd`)
        self.online = CostSurface(ONLINE, level_memory=memory / 4, ratio_memory=memory)
        self.updates = 0
        self.rejected = 0  # steps not learned from: absurd times
        self.floor = 1e-5  # no step is predicted faster than 10 us

    @property
    def grows_with_work(self) -> bool:
        """Whether a step's predicted cost never falls as it verifies or drafts more tokens:
        every coefficient of the verify and draft terms is non-negative in every part, as in
        every profile fitted since theta is non-negative (`fit_theta`). Not in the shipped CPU
        profiles, fitted before: with a negative coefficient and a part clipped at 0, a step
        where 4 of 5 rows draft is priced below both one row and all five drafting, and a
        bound that takes the cheapest of those (`RequestGoodput.none_pays`) is no bound."""
        return bool((self.theta[_WORK] >= 0).all())

    def frozen(self) -> StepCostModel:
        """The prior: the same theta and profile surface, no refinement (what the profile said)."""
        return StepCostModel(self.theta, self.profile, refine=False, memory=self.memory, rejection=self.rejection,
                             foreign=self.foreign)  # fmt: skip

    # ---------------------------------------------------------------- predict
    def _prior_parts(self, shapes: Sequence[StepShape]) -> np.ndarray:
        """[N, 3] the basis (no part below 0: a negative part is the fit's, not the machine's),
        its draft and verify parts times the profile's surface. Not its prefill part: the
        surface is fitted on whole-batch decode steps (`CostSurface.fit`), a correction over
        rows and draft length, while a prefill chunk's cost follows its tokens; applied to it,
        the cell of a streaming run's first few rows (+50%, its decode steps' residual) priced
        the chunks prefilled beside them 1.5x (issue 32)."""
        parts = np.maximum(features(shapes) @ self.theta, 0.0)
        if self.profile is not None:
            parts[:, _DECODE] *= np.exp(self.profile(list(shapes)))[:, None]
        return parts

    def _factor(self, shapes: Sequence[StepShape]) -> np.ndarray:
        return np.exp(self.online(list(shapes))) if self.online.observations else np.ones(len(shapes))

    def predict_parts(self, shapes: Sequence[StepShape]) -> np.ndarray:
        """[N, 3] predicted prefill, draft and verify seconds."""
        return self._prior_parts(shapes) * self._factor(shapes)[:, None]

    def predict(self, shapes: Sequence[StepShape]) -> np.ndarray:
        """[N] predicted step seconds."""
        return np.maximum(self._prior_parts(shapes).sum(1) * self._factor(shapes), self.floor)

    def evidence(self, shape: StepShape) -> float:
        """How many recent whole-batch steps at this shape's batch size and draft length the
        online surface holds (decayed): what an explorer asks before probing it."""
        return self.online.evidence(shape)

    def ratio_sd(self, a: StepShape, b: StepShape) -> float:
        """How unsure the model is of log(T(a) / T(b)), as the goodput controller asks before
        probing: the online surface's posterior after the last step (its priors are as wide as
        a profile's error on its own machine), at least `FOREIGN_RATIO_SD` with a profile made
        for another machine; 0 when the model does not refine (nothing to learn by probing)."""
        if not self.refine:
            return 0.0
        sd = self.online.contrast_sd(a, b)
        return max(sd, FOREIGN_RATIO_SD) if self.foreign else sd

    # ----------------------------------------------------------------- learn
    def update(self, record: StepRecord) -> None:
        """Learn from what this step cost."""
        if not self.refine:
            return
        o = record.outcome
        self.observe(StepShape.of(record), (o.prefill_s, o.draft_s, o.verify_s))

    def observe(self, shape: StepShape, seconds: Sequence[float]) -> None:
        """Learn that a step of `shape` took (prefill, draft, verify) `seconds` (not if refine=False)."""
        if not self.refine:
            return
        total = float(np.sum(np.asarray(seconds, dtype=np.float64)))
        prior = max(float(self._prior_parts([shape]).sum()), self.floor)
        predicted = prior * float(self._factor([shape])[0])
        if not math.isfinite(total) or total <= 0 or not 1 / self.rejection < total / predicted < self.rejection:
            self.rejected += 1
            return
        self.online.observe(shape, math.log(total / prior))
        self.updates += 1

    # ------------------------------------------------------------------- data
    def to_dict(self) -> dict[str, Any]:
        return {"basis": list(BASIS), "theta": self.theta.tolist(), "memory": self.memory,
                "updates": self.updates, "rejected": self.rejected}  # fmt: skip


@dataclass
class StepCostProfile:
    """Measured steps of one (models, machine), the theta fitted on them, and where they came from."""

    fingerprint: Fingerprint
    steps: list[dict[str, float]]  # StepShape fields + prefill_s, draft_s, verify_s
    theta: np.ndarray  # [len(BASIS), 3]
    meta: dict[str, Any] = field(default_factory=dict)  # created, seconds spent, held-out error, ...

    @classmethod
    def from_steps(cls, fingerprint: Fingerprint, shapes: list[StepShape], seconds: np.ndarray,
                   meta: dict[str, Any] | None = None, nonnegative: bool = True,
                   held: Sequence[str] = ()) -> StepCostProfile:  # fmt: skip
        seconds = np.asarray(seconds, dtype=np.float64).reshape(len(shapes), len(PARTS))
        steps = [asdict(s) | dict(zip(PARTS, map(float, y))) for s, y in zip(shapes, seconds)]
        theta = fit_theta(shapes, seconds, nonnegative=nonnegative, held=held)
        made = cls(fingerprint, steps, theta, dict(meta or {}))
        total = np.maximum(seconds.sum(1), 1e-9)
        basis_only = np.maximum(np.maximum(features(shapes) @ theta, 0.0).sum(1), 1e-5)
        made.meta["basis_mape"] = float(np.mean(np.abs(basis_only - total) / total))
        made.meta["fit_mape"] = float(np.mean(np.abs(made.model(refine=False).predict(shapes) - total) / total))
        return made

    def shapes(self) -> tuple[list[StepShape], np.ndarray]:
        names = StepShape.names()
        shapes = [StepShape(**{n: int(s[n]) for n in names if n in s}) for s in self.steps]
        return shapes, np.array([[s[p] for p in PARTS] for s in self.steps], dtype=np.float64)

    def surface(self) -> CostSurface:
        """The profile's correction of its basis: the steps' log residuals (module docstring)."""
        shapes, seconds = self.shapes()
        base = np.maximum(np.maximum(features(shapes) @ self.theta, 0.0).sum(1), 1e-5)
        return CostSurface.fit(shapes, np.log(np.maximum(seconds.sum(1), 1e-9) / base), PROFILE)

    def model(self, refine: bool = True, memory: float = 400.0, foreign: bool = False) -> StepCostModel:
        """The model this profile gives; `foreign`: it is used on another machine or models."""
        return StepCostModel(self.theta, self.surface(), refine=refine, memory=memory, foreign=foreign)

    # ------------------------------------------------------------------- file
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "fingerprint": asdict(self.fingerprint),
                "basis": list(BASIS), "parts": list(PARTS), "theta": self.theta.tolist(), "meta": self.meta,
                "steps": self.steps}  # fmt: skip

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(self.to_dict(), indent=0) + "\n")
        partial.replace(path)  # a reader never sees half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> StepCostProfile:
        """Read and check a profile; `ProfileError` says what is wrong and what to do."""
        path = Path(path)
        remake = "make one on this machine with `adactl profile`"
        if not path.is_file():
            raise ProfileError(f"step-cost profile {path} does not exist; {remake}")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProfileError(f"step-cost profile {path} is not valid JSON ({e}); {remake}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f'{path} is not an adactl step-cost profile (no "format": "{FORMAT}"); {remake}')
        if data.get("version") != VERSION:
            version = data.get("version")
            raise ProfileError(f"{path} is a version {version} profile; this adactl reads {VERSION}; {remake}")
        try:
            fingerprint = Fingerprint(**data["fingerprint"])
            if data["basis"] not in (list(BASIS), *map(list, OLD_BASES)):
                raise ProfileError(f"{path} uses the cost basis {data['basis']}, not {list(BASIS)}; {remake}")
            theta = np.array(data["theta"], dtype=np.float64)
            if theta.ndim == 2 and len(theta) == len(data["basis"]) < len(BASIS):  # an older basis: its missing
                theta = np.vstack([theta, np.zeros((len(BASIS) - len(theta), theta.shape[1]))])  # terms cost 0
            if theta.shape != (len(BASIS), len(PARTS)) or not np.isfinite(theta).all():
                raise ProfileError(f"{path}: theta must be {len(BASIS)} x {len(PARTS)} finite numbers; {remake}")
            steps = [dict(s) for s in data["steps"]]
            # (older profiles: one prompt per step, rows of equal context)
            needed = {*StepShape.names(), *PARTS} - {"prefill_attention", "span_tokens", "moved_tokens",
                                                      "catchup_tokens"}  # fmt: skip
            if any(not needed <= s.keys() for s in steps):
                raise ProfileError(f"{path}: a step lacks one of {sorted(needed)}; {remake}")
            bad = next(
                (s for s in steps if not all(math.isfinite(float(s[n])) and float(s[n]) >= 0 for n in needed)), None
            )
            if bad is not None:  # a negative count or time, or NaN: no machine measured that
                raise ProfileError(f"{path}: a step has a negative or non-finite count or time ({bad}); {remake}")
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ProfileError):
                raise
            raise ProfileError(f"{path} is corrupt ({type(e).__name__}: {e}); {remake}") from None
        return cls(fingerprint, steps, theta, dict(data.get("meta", {})))
