"""How far a step-cost prediction is off, as a smooth surface over the shapes that decide
speculation: the batch (rows) and the draft tokens verified per row.

    log(measured / predicted) = r(rows, j) + noise        j = verify tokens computed per row - 1
    r = g + l[b] + (s + t[b]) j + c[b, j]

- g: a global level; l[b]: the level of batch bucket b (rows 1, 2, 4, ... 256; a batch in
  between interpolates its two buckets in log2 rows);
- s, t[b]: the slope in j, global and per bucket;
- c[b, j]: one cell per bucket and j = 0 .. 8 (a fractional j interpolates two cells).

A token tree's j is its depth (its draft forwards), not its nodes a row less one: chains, which
teach the slopes and cells, move one draft forward and one verified token together, and a
width-4 tree verifying 8-12 nodes a row read them extrapolated to j = 8; in the H100 replay
the online surface then priced trees 5-12% above the profile and the tree controllers drafted
chains where a fixed tree was 1.14-1.19x faster (issue 34, `docs/issue34/trees_w4`). A chain's
j is unchanged (a row verifies at most its draft and one more).

Every term has a zero-mean Gaussian prior (`Sigmas`), steps are observations with noise
`sigma_noise`, and the surface is the posterior mean (ridge regression on the sufficient
statistics, solved when a prediction follows an update). Observations are forgotten with
weight `decay ** age`, so where no recent step says otherwise the surface returns to 0: the
prediction it corrects.

Why this shape (issue 30: recursive least squares over the cost basis let a few dozen steps
of one batch size and draft length rewrite every other shape's cost, and goodput drafted at
batch 64 where plain decoding was twice as fast):
- **Levels are ratio-neutral.** A step moves the levels first (their priors are wide), and a
  level scales every draft length of its batch alike, so a run of plain steps at batch 64
  that says "this machine is 10% slower" changes no decision.
- **Slopes and cells move with contrast.** The slope terms are 0 at j = 0, and a cell's
  prior (0.15) is half as wide as its bucket's level (0.3), so most of what one draft
  length's steps say goes to the level; what is left moves a ratio where steps of different
  j at one batch size disagree with the prediction differently, and only where measured.
  (Chosen by measurement in the replay: narrower cells, 0.05, kept goodput at 0.91x the best
  fixed k on a GPU started from a CPU's profile; 0.15 reaches 0.98x, and a server's phases
  move no ratio by more than 8.5%; 0.3 moves them by 10%.)
- **Levels drift slowly, and one step is noisy.** A level's process noise is its own (0.02
  a step), not its prior's width spread over its memory (which let the level follow every
  single step: a gain of 0.9, so one slow step moved every prediction of its batch size),
  and a step's noise is 0.1, this CPU's. Measured in the replay of a server's phases
  (`PYTHONPATH=. python docs/issue30/level_drift_replay.py`: the truth is the steps of
  models/estimators/step_cost_cpu.json, the replay's step noise 0.1): the worst ratio error
  11.9% against 17.1%, no wrong goodput choice against one, one-step-ahead error 8.8%
  against 11.0% (noise 0.05: 5.9% against 8.5%).
- **Only whole-batch steps teach ratios.** A step whose rows draft or verify different
  lengths, or that prefills (probes on part of the batch, SV's cuts, trees), updates the
  levels only: its cost has parts the ratio of whole-batch steps does not (a split verify
  forward, a prefill chunk), and a probe on a quarter of the rows must not move the model
  toward drafting at a batch size where no whole-batch draft was ever served.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from adactl.runtime.shapes import StepShape

BUCKETS = 9  # rows 1, 2, 4, ... 256 (log2 0 .. 8); more rows count as 256
JS = 9  # j = 0 .. 8; more is 8
_G, _L, _S, _T, _C = 0, 1, 1 + BUCKETS, 2 + BUCKETS, 2 + 2 * BUCKETS
SIZE = _C + BUCKETS * JS


@dataclass(frozen=True)
class Sigmas:
    """Prior standard deviations of the surface's terms (log space: 0.1 is about 10%)."""

    level: float = 1.0  # g: a machine can be several times slower or faster than its profile
    bucket_level: float = 0.3  # l[b]
    slope: float = 0.05  # s, per verified token per row
    bucket_slope: float = 0.05  # t[b]
    cell: float = 0.15  # c[b, j]: wide enough for a far-off profile to be corrected where served
    noise: float = 0.1  # one step's log time around the surface (CPU steps: 5-10%)
    level_drift: float | None = 0.02  # per observation, how far the levels may move (None: as their prior says)

    def precision(self) -> np.ndarray:
        """[SIZE] prior precision of each term."""
        sig = np.empty(SIZE)
        sig[_G], sig[_L:_S], sig[_S], sig[_T:_C], sig[_C:] = (
            self.level, self.bucket_level, self.slope, self.bucket_slope, self.cell)  # fmt: skip
        return 1.0 / sig**2


ONLINE = Sigmas()
# the profile's own correction of its linear fit: ratios off by 20% and more (measured), many
# steps per cell, no drift
PROFILE = Sigmas(level=0.5, bucket_level=0.3, slope=0.1, bucket_slope=0.1, cell=0.2, noise=0.05, level_drift=None)


def is_whole_batch(shape: StepShape) -> bool:
    """Every row drafted the same length and verified all of it (or none drafted), no prefill:
    a step whose cost compares with the same step at another draft length."""
    rows, k = shape.rows, shape.max_draft
    same_draft = shape.draft_tokens == rows * k and shape.max_verify == k + 1
    return rows > 0 and shape.prefill_tokens == 0 and same_draft and shape.verify_computed == rows * (k + 1)


def _j(rows: int, computed: int, depth: int) -> float:
    """A shape's draft-length coordinate: verified tokens a row less one, a tree at its depth
    (the module docstring), clipped to the cells."""
    return min(max(min(computed / rows - 1.0, depth), 0.0), JS - 1.0)


def basis(shape: StepShape, ratios: bool = True) -> np.ndarray:
    """[SIZE] the terms' weights at a shape; `ratios=False`: the levels only."""
    phi = np.zeros(SIZE)
    phi[_G] = 1.0
    if shape.rows <= 0:  # a prefill-only step: the global level
        return phi
    x = min(max(math.log2(shape.rows), 0.0), BUCKETS - 1.0)
    b0 = int(x)
    b1, wb = min(b0 + 1, BUCKETS - 1), x - b0
    phi[_L + b0] += 1.0 - wb
    phi[_L + b1] += wb
    if not ratios:
        return phi
    j = _j(shape.rows, shape.verify_computed, shape.max_draft)
    j0 = int(j)
    j1, wj = min(j0 + 1, JS - 1), j - j0
    phi[_S] = j
    phi[_T + b0] += (1.0 - wb) * j
    phi[_T + b1] += wb * j
    for b, w in ((b0, 1.0 - wb), (b1, wb)):
        phi[_C + b * JS + j0] += w * (1.0 - wj)
        phi[_C + b * JS + j1] += w * wj
    return phi


VECTOR_FROM = 24  # shapes: below, plain Python a shape at a time (numpy's 30 small calls cost 40 us however few)


def _at(w: list[float], rows: int, computed: int, depth: int) -> float:
    """`basis(shape) @ w` of one shape, in plain Python (`at_shapes`)."""
    if rows <= 0:
        return w[_G]
    x = min(max(math.log2(rows), 0.0), BUCKETS - 1.0)
    b0 = int(x)
    b1, wb = min(b0 + 1, BUCKETS - 1), x - b0
    j = _j(rows, computed, depth)
    j0 = int(j)
    j1, wj = min(j0 + 1, JS - 1), j - j0
    c0, c1 = _C + b0 * JS, _C + b1 * JS
    level = (1.0 - wb) * w[_L + b0] + wb * w[_L + b1]
    slope = w[_S] + (1.0 - wb) * w[_T + b0] + wb * w[_T + b1]
    cells = (1.0 - wb) * ((1.0 - wj) * w[c0 + j0] + wj * w[c0 + j1]) + wb * ((1.0 - wj) * w[c1 + j0] + wj * w[c1 + j1])
    return w[_G] + level + j * slope + cells


def at_shapes(w: np.ndarray, shapes: list[StepShape]) -> np.ndarray:
    """[N] `basis(shape) @ w` for every shape at once, from the few terms a shape touches (a
    level, a slope and four cells): the controllers price 9 shapes (`goodput`) to hundreds
    (`goodput-req`'s search) every step. With `basis` a shape at a time (14 us a shape, two
    surfaces a prediction), 9 shapes took 0.146 ms and 400 took 5.8 ms; now 0.043 and 0.47 ms
    (`goodput`'s decision on the replay 0.19 -> 0.16 ms at batch 1, 0.31 -> 0.20 at batch 64;
    `goodput-req`'s 0.96 -> 0.90 and 2.4 -> 1.7 ms: the rest of it is its search's own work)."""
    n = len(shapes)
    if n < VECTOR_FROM:
        terms = w.tolist()
        return np.array([_at(terms, s.rows, s.verify_computed, s.max_draft) for s in shapes], dtype=np.float64)
    rows = np.fromiter((s.rows for s in shapes), np.float64, n)
    computed = np.fromiter((s.verify_computed for s in shapes), np.float64, n)
    live = rows > 0  # (a prefill-only step: the global level alone)
    rows = np.where(live, rows, 1.0)
    x = np.clip(np.log2(rows), 0.0, BUCKETS - 1.0)
    b0 = x.astype(np.int64)
    b1, wb = np.minimum(b0 + 1, BUCKETS - 1), x - b0
    depth = np.fromiter((s.max_draft for s in shapes), np.float64, n)
    j = np.clip(np.minimum(computed / rows - 1.0, depth), 0.0, JS - 1.0)
    j0 = j.astype(np.int64)
    j1, wj = np.minimum(j0 + 1, JS - 1), j - j0
    level = (1.0 - wb) * w[_L + b0] + wb * w[_L + b1]
    slope = w[_S] + (1.0 - wb) * w[_T + b0] + wb * w[_T + b1]
    cells = (1.0 - wb) * ((1.0 - wj) * w[_C + b0 * JS + j0] + wj * w[_C + b0 * JS + j1]) + wb * (
        (1.0 - wj) * w[_C + b1 * JS + j0] + wj * w[_C + b1 * JS + j1]
    )
    return w[_G] + np.where(live, level + j * slope + cells, 0.0)


class CostSurface:
    """r(shape), learned from (shape, log residual) observations; see the module docstring.

    A Kalman filter over the terms: each is an AR(1) process around 0 with the stationary
    standard deviation of its prior and a memory (time constant, in observations) of its own,
    short for the levels (a machine's speed drifts: a co-located job comes and goes) and long
    for the slopes and cells (a ratio is a property of the hardware). Before each observation
    every term decays toward 0 by its memory, so where nothing is observed the surface
    returns to the prediction it corrects; `memory=None` keeps every observation (a
    profile's steps: exact Bayesian ridge regression)."""

    def __init__(self, sigmas: Sigmas = ONLINE, level_memory: float | None = None,
                 ratio_memory: float | None = None) -> None:  # fmt: skip
        if any(m is not None and m < 1 for m in (level_memory, ratio_memory)):
            raise ValueError(f"memories must be >= 1 observation, got {level_memory}, {ratio_memory}")
        self.sigmas = sigmas
        var = 1.0 / sigmas.precision()
        rho = np.ones(SIZE)
        if level_memory is not None:
            rho[:_S] = math.exp(-1.0 / level_memory)
        if ratio_memory is not None:
            rho[_S:] = math.exp(-1.0 / ratio_memory)
        self._rho = rho  # [SIZE] per-observation decay of each term
        self._rho2 = np.outer(rho, rho)
        self._q = (1.0 - rho**2) * var  # [SIZE] process noise: the stationary variance stays the prior's
        if sigmas.level_drift is not None and level_memory is not None:
            self._q[:_S] = sigmas.level_drift**2
        self._p = np.diag(var)  # [SIZE, SIZE] posterior covariance
        self._w = np.zeros(SIZE)  # posterior mean
        self._counts = np.zeros(BUCKETS * JS)  # decayed whole-batch steps per cell
        self.observations = 0

    def observe(self, shape: StepShape, residual: float, weight: float = 1.0) -> None:
        """A step of `shape` took exp(residual) times the prediction this surface corrects
        (`weight` steps that did: a cell's median stands for its steps)."""
        whole = is_whole_batch(shape)
        phi = basis(shape, ratios=whole)
        if self._q.any():  # time passes: every term decays toward 0 and grows uncertain
            self._w *= self._rho
            self._p *= self._rho2
            self._p[np.diag_indices(SIZE)] += self._q
            self._counts *= self._rho[_C]
        p_phi = self._p @ phi
        gain = p_phi / (phi @ p_phi + self.sigmas.noise**2 / weight)
        self._w += gain * (residual - phi @ self._w)
        self._p -= np.outer(gain, p_phi)
        if whole:
            self._counts += weight * phi[_C:]
        self.observations += 1

    def evidence(self, shape: StepShape) -> float:
        """Recent whole-batch steps at this shape's cells: a decayed count (interpolated)."""
        return float(basis(shape)[_C:] @ self._counts)

    def contrast_sd(self, a: StepShape, b: StepShape) -> float:
        """The posterior standard deviation of r(a) - r(b): how unsure the surface is of the
        ratio of two shapes' costs (at one batch size, that of two draft lengths). Where no
        recent step measured it, the prior's (about 0.22 between draft lengths 0 and 1)."""
        d = basis(a) - basis(b)
        return float(math.sqrt(max(d @ self._p @ d, 0.0)))

    def __call__(self, shapes: list[StepShape]) -> np.ndarray:
        """[N] r at each shape (log factor)."""
        if not self.observations:
            return np.zeros(len(shapes))
        return at_shapes(self._w, shapes)

    @classmethod
    def fit(cls, shapes: list[StepShape], residuals: np.ndarray, sigmas: Sigmas = PROFILE) -> CostSurface:
        """The surface of a set of measured steps, none forgotten (a profile's): its whole-batch
        steps, those of one (rows, draft length) as one value weighted by their count
        (`cell_values`). The other steps (prefill chunks, cut verifies, part of the batch
        drafting) are what the basis was fitted for; their residuals would only pull the
        levels the whole-batch cells are measured against (measured: 17% at batch 16)."""
        surface = cls(sigmas)
        for shape, value, count in cell_values(shapes, residuals):
            surface.observe(shape, value, weight=count)
        return surface


def cell_values(shapes: list[StepShape], residuals: np.ndarray) -> list[tuple[StepShape, float, int]]:
    """(a shape, its cell's log residual, its steps) for each (rows, draft length) that
    whole-batch steps measured, the steps in the order they ran. A round (consecutive
    whole-batch steps at one batch size, each draft length once: the profiler's) pairs each
    length with the plain step next to it: a cell is the median of the rounds' plain steps
    plus the median over rounds of its step's residual less its round's plain one, as
    `adactl profile --check` measures a ratio. The median because a CPU step now and then
    takes far longer than its neighbours; paired because the profiler spreads a size's rounds
    over its whole run (`adactl.profiler.measure`), and the machine's speed moves between
    them more than within one: in 32 held-out checks of 21 ratios (`make bench` runs 38-43, 45
    and 46's own profiles and four more), the cells' plain medians put 61 of 672 ratios beyond
    5% and met all 21 in 4 checks, paired ones 29 and 13 (`docs/issue30/paired_cells`). A cell
    no round pairs (a profile without plain steps at its size): the median of its steps."""
    cells: dict[tuple[int, int], list[tuple[StepShape, float]]] = {}
    rounds: list[tuple[int, dict[int, float]]] = []
    current: tuple[int, dict[int, float]] | None = None
    for s, r in zip(shapes, np.asarray(residuals, dtype=np.float64)):
        if not is_whole_batch(s):
            current = None
            continue
        cells.setdefault((s.rows, s.max_draft), []).append((s, float(r)))
        if current is None or current[0] != s.rows or s.max_draft in current[1]:
            current = (s.rows, {})
            rounds.append(current)
        current[1][s.max_draft] = float(r)
    paired: dict[int, list[dict[int, float]]] = {}
    for rows, lengths in rounds:
        if 0 in lengths and len(lengths) > 1:
            paired.setdefault(rows, []).append(lengths)
    out = []
    for (rows, k), steps in cells.items():
        diffs = [x[k] - x[0] for x in paired.get(rows, []) if k in x]
        if diffs:
            value = float(np.median([x[0] for x in paired[rows]])) + float(np.median(diffs))
        else:
            value = float(np.median([r for _, r in steps]))
        out.append((steps[len(steps) // 2][0], value, len(steps)))
    return out
