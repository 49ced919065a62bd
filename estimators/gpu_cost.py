"""A GPU's step cost computed from the hardware's figures and the model's shape, calibrated
to published measurements: the GPU regime on any machine (DESIGN.md section 9).

A serving step on a GPU is a roofline (Vidur, LLMServingSim and the roofline literature use
this form). For a step whose target forward computes N tokens (verified tokens, no padding:
a fused engine flattens its rows) over R rows holding C context tokens in all:

    verify_s  = launch + row_s R + token_s N + spec_row_s R_spec
                + T_w sqrt(1 + (N / N*)^2)                     linear layers
                + max(C kv_bytes / BW', 4 L h N (C / R) / F')  attention: KV read, or its FLOPs
                + 2 L (allreduce_s + 2 (tp-1)/tp N h b / link)  tensor parallelism (tp > 1)
    draft_s   = k (draft_launch_s + f T_w sqrt(1 + (R_draft / N*)^2))   k sequential draft forwards
    prefill_s = what P prompt tokens fused into the same forward add: the linear layers'
                growth from N to N + P tokens, token_s P, their attention FLOPs
                4 L h A / F' (A: the query-key pairs, P (P + 1) / 2 for one prompt from
                scratch, summed over prompts), their all-reduce bytes

    T_w = weight bytes / tp / BW'      reading the weights once (BW' = HBM bandwidth x efficiency)
    N*  = F' b / (2 BW')               the knee where a token's FLOPs (2 per weight) outrun its bytes

F' is the dense matrix rate times its efficiency, b bytes per parameter, L layers of hidden
size h, f the draft's cost as a fraction of the target's linear layers (an EAGLE head in a
fused engine 0.05-0.12; a 135M draft model under transformers about 0.36), R_spec the rows
that draft. Below the knee a step's cost is nearly flat in batch size and in tokens
verified, which is the seeds' lever; past it every token costs 2 P / F'.

`EngineCosts` holds what the serving engine adds to the physics (efficiencies, launch and
per-row costs, the draft). `VLLM_EAGLE` is fitted by `calibrate` to vLLM's published
dynamic speculative-decoding table for Llama-3.1-8B with EAGLE on an H100 and to published
batch-1 decode steps of that model on an H100 and an A100 (`PUBLISHED`); the same engine
costs serve every GPU and model, so an A100 or a 70B profile is a prediction from the
figures, not a fit. The table gives no context length; `CALIBRATION_CONTEXT` is assumed.

`GpuStepCost` predicts like a step-time model (`predict_parts`), so the replay can run on
it directly; `computed_profile` writes its steps as the portable profile file `adactl
profile` writes, so every `--profile` consumer takes it.
Not here: KV memory as a pool (the replay), acceptance (traces), measuring a real GPU
(`adactl profile --device cuda`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from adactl.estimators.step_cost import Fingerprint, ProfileError, StepCostProfile
from adactl.runtime.shapes import StepShape, prefill_pairs


class GpuCostError(ProfileError):
    """A GPU, model shape or engine-cost figure that is unknown or physically impossible."""


def _check_positive(owner: object, names: Sequence[str], allow_zero: Sequence[str] = ()) -> None:
    for f in fields(owner):  # type: ignore[arg-type]
        if f.name not in names:
            continue
        v = getattr(owner, f.name)
        bad = not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (v == 0 and f.name not in allow_zero)
        if bad:
            raise GpuCostError(f"{type(owner).__name__} {getattr(owner, 'name', '')!r}: {f.name} must be a finite "
                               f"number {'>= 0' if f.name in allow_zero else '> 0'}, got {v!r}")  # fmt: skip


@dataclass(frozen=True)
class GPU:
    """A GPU's datasheet figures (dense, no sparsity)."""

    name: str
    label: str  # the device name torch reports
    hbm_bytes_per_s: float
    flops: float  # dense bf16/fp16 matrix rate
    memory_bytes: float
    link_bytes_per_s: float  # NVLink, one direction, per GPU (tensor-parallel all-reduce)
    host_bytes_per_s: float  # PCIe to host memory, one direction (offload)

    def __post_init__(self) -> None:
        _check_positive(self, [f.name for f in fields(self) if f.name not in ("name", "label")])


GPUS = {
    "h100": GPU("h100", "NVIDIA H100 80GB HBM3", 3.35e12, 989e12, 80e9, 450e9, 55e9),
    "h200": GPU("h200", "NVIDIA H200", 4.8e12, 989e12, 141e9, 450e9, 55e9),
    "a100": GPU("a100", "NVIDIA A100-SXM4-80GB", 2.039e12, 312e12, 80e9, 300e9, 25e9),
}


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape (Llama family: gated MLP, grouped-query attention)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def __post_init__(self) -> None:
        _check_positive(self, ["layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"])
        if self.heads % self.kv_heads:
            raise GpuCostError(f"model {self.name!r}: heads ({self.heads}) must be a multiple of kv_heads "
                               f"({self.kv_heads})")  # fmt: skip

    @property
    def linear_params(self) -> int:
        """Weights every forward reads: attention and MLP of every layer, and the LM head."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attention = h * self.heads * self.head_dim * 2 + h * kv * 2
        return self.layers * (attention + 3 * h * self.intermediate) + self.vocab * h

    def kv_bytes_per_token(self, bytes_per_param: float = 2.0) -> float:
        """K and V of every layer (Llama-3.1-8B in bf16: 131,072 B)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_param


MODELS = {
    "llama-3.1-8b": ModelShape("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256),
    "llama-3.1-70b": ModelShape("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256),
    "smollm2-135m": ModelShape("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152),
}


@dataclass(frozen=True)
class EngineCosts:
    """What a serving engine adds to the hardware's physics (see the module docstring)."""

    name: str
    bandwidth_efficiency: float  # achieved / datasheet HBM bandwidth
    flops_efficiency: float  # achieved / datasheet matrix rate (sets the knee N*)
    launch_s: float  # per step: scheduling, graph launch
    row_s: float  # per decode row: inputs, sampling
    token_s: float  # per verified token: logits and rejection sampling over the vocabulary
    spec_row_s: float  # per row that drafts: the proposer's bookkeeping
    draft_fraction: float  # one draft forward's linear layers / the target's (EAGLE head ~0.1)
    draft_launch_s: float  # per draft forward
    allreduce_s: float  # latency of one all-reduce (two per layer under tensor parallelism)

    def __post_init__(self) -> None:
        names = [f.name for f in fields(self) if f.name != "name"]
        _check_positive(self, names, allow_zero=[n for n in names if n.endswith("_s") or n == "draft_fraction"])
        if self.bandwidth_efficiency > 1 or self.flops_efficiency > 1:
            raise GpuCostError(f"engine {self.name!r}: efficiencies are fractions of the datasheet (<= 1), got "
                               f"{self.bandwidth_efficiency}, {self.flops_efficiency}")  # fmt: skip


# Fitted by `calibrate()` on `PUBLISHED` (every point within 9%; docs/gpu_regime.md). The fit
# puts vLLM's launch cost in its bandwidth efficiency: the A100 and H100 batch-1 steps differ
# by what 0.69 of the datasheet bandwidth explains, with no constant left over.
VLLM_EAGLE = EngineCosts(
    name="vllm-eagle", bandwidth_efficiency=0.692, flops_efficiency=0.563, launch_s=0.0, row_s=4.73e-6, token_s=0.0,
    spec_row_s=16.7e-6, draft_fraction=0.112, draft_launch_s=0.0, allreduce_s=8e-6,
)  # fmt: skip
CALIBRATION_CONTEXT = 256  # mean context per request assumed for the published table (it states none)


@dataclass(frozen=True)
class GpuStepCost:
    """The step cost of `model` on `tp` x `gpu` under `engine`: a step-time predictor."""

    gpu: GPU
    model: ModelShape
    engine: EngineCosts = VLLM_EAGLE
    tp: int = 1
    bytes_per_param: float = 2.0

    def __post_init__(self) -> None:
        if (
            not isinstance(self.tp, int)
            or self.tp < 1
            or self.model.kv_heads % self.tp
            and self.tp % self.model.kv_heads
        ):
            raise GpuCostError(f"tensor-parallel degree must be a positive divisor or multiple of the model's "
                               f"{self.model.kv_heads} KV heads, got {self.tp!r}")  # fmt: skip
        if not 0 < self.bytes_per_param <= 8:
            raise GpuCostError(f"bytes per parameter must be in (0, 8], got {self.bytes_per_param!r}")

    @property
    def name(self) -> str:
        where = self.gpu.name if self.tp == 1 else f"{self.gpu.name}x{self.tp}"
        return f"{where}-{self.model.name}"

    # ------------------------------------------------------------- physics
    @property
    def bandwidth(self) -> float:
        return self.gpu.hbm_bytes_per_s * self.engine.bandwidth_efficiency

    @property
    def flops(self) -> float:
        return self.gpu.flops * self.engine.flops_efficiency

    @property
    def weight_s(self) -> float:
        """T_w: one read of a GPU's share of the weights."""
        return self.model.linear_params * self.bytes_per_param / self.tp / self.bandwidth

    @property
    def knee(self) -> float:
        """N*: tokens per step where the linear layers turn compute-bound."""
        return self.flops * self.bytes_per_param / (2 * self.bandwidth)

    def linear_s(self, tokens: float) -> float:
        return self.weight_s * math.sqrt(1.0 + (tokens / self.knee) ** 2)

    def attention_s(self, queries: float, context: float, rows: int) -> float:
        """Decode attention: every row's KV read once, or the queries' FLOPs if more."""
        m = self.model
        read = context * m.kv_bytes_per_token(self.bytes_per_param) / self.tp / self.bandwidth
        work = 4 * m.layers * m.heads * m.head_dim * queries * (context / max(rows, 1)) / self.tp / self.flops
        return max(read, work)

    def allreduce_s(self, tokens: float) -> float:
        if self.tp == 1 or tokens <= 0:
            return 0.0
        payload = tokens * self.model.hidden * self.bytes_per_param * 2 * (self.tp - 1) / self.tp
        return 2 * self.model.layers * (self.engine.allreduce_s + payload / self.gpu.link_bytes_per_s)

    def parts(self, shape: StepShape) -> tuple[float, float, float]:
        """(prefill, draft, verify) seconds of a step of this shape."""
        e, m = self.engine, self.model
        rows, n, p = shape.rows, shape.verify_tokens, shape.prefill_tokens
        verify = 0.0
        if rows:
            spec_rows = math.ceil(shape.draft_tokens / shape.max_draft) if shape.max_draft else 0
            verify = (e.launch_s + e.row_s * rows + e.token_s * n + e.spec_row_s * spec_rows + self.linear_s(n)
                      + self.attention_s(n, shape.context_tokens, rows) + self.allreduce_s(n))  # fmt: skip
        prefill = 0.0
        if p:
            own = 4 * m.layers * m.heads * m.head_dim * shape.prefill_attention / self.tp / self.flops
            grown = self.linear_s(n + p) - (self.linear_s(n) if rows else 0.0)
            prefill = (0.0 if rows else e.launch_s) + grown + e.token_s * p + own
            prefill += self.allreduce_s(n + p) - self.allreduce_s(n)
        draft = 0.0
        if shape.max_draft:
            per_forward = math.ceil(shape.draft_tokens / shape.max_draft)  # rows drafting
            draft = shape.max_draft * (e.draft_launch_s + e.draft_fraction * self.linear_s(per_forward))
        return prefill, draft, verify

    def predict_parts(self, shapes: Sequence[StepShape]) -> np.ndarray:
        """[N, 3] prefill, draft and verify seconds (a step-time predictor)."""
        return np.array([self.parts(s) for s in shapes], dtype=np.float64).reshape(len(shapes), 3)

    def predict(self, shapes: Sequence[StepShape]) -> np.ndarray:
        return self.predict_parts(shapes).sum(1)

    def plain_ms(self, rows: int, k: int = 0, context: int = CALIBRATION_CONTEXT) -> float:
        """Milliseconds of a whole-batch step: `rows` rows, each drafting and verifying k tokens."""
        return 1000 * float(self.predict([whole_batch(rows, k, context)])[0])

    def verify_ms(self, rows: int, k: int = 0, context: int = CALIBRATION_CONTEXT) -> float:
        """Milliseconds of the target's verify forward alone over `rows` rows of k + 1 tokens."""
        return 1000 * self.parts(StepShape(rows, rows * (k + 1), k + 1, 0, 0, 0, rows * context))[2]

    def kv_tokens(self, utilization: float = 0.9) -> int:
        """Tokens of KV the `tp` GPUs hold after the weights (vLLM's sizing; 8B on one H100: 426,788)."""
        from adactl.runtime.kv_pool import kv_tokens_for

        weights = (self.model.linear_params + self.model.vocab * self.model.hidden) * self.bytes_per_param
        per_token = self.model.kv_bytes_per_token(self.bytes_per_param)
        return kv_tokens_for(self.gpu.memory_bytes * self.tp, weights, per_token, utilization)

    def fingerprint(self) -> Fingerprint:
        where = self.gpu.label if self.tp == 1 else f"{self.tp}x {self.gpu.label}"
        return Fingerprint(self.model.name, f"computed draft (f = {self.engine.draft_fraction:g})", "none", "cuda",
                           f"{where} (computed: {self.engine.name})", "bfloat16" if self.bytes_per_param == 2 else
                           f"{self.bytes_per_param:g} bytes/param", "computed", 0)  # fmt: skip


def whole_batch(rows: int, k: int, context: int = CALIBRATION_CONTEXT) -> StepShape:
    """`rows` rows of `context` tokens each, every one drafting and verifying k tokens."""
    return StepShape(rows, rows * (k + 1), k + 1, rows * k, k, 0, rows * context)


# ---------------------------------------------------------------- profiles
PROFILE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PROFILE_KS = (0, 1, 2, 3, 4, 5, 6, 8)
PROFILE_CONTEXTS = (128, 512, 2048)


def profile_shapes() -> list[StepShape]:
    """The steps a computed profile holds: whole-batch steps over rows x k x context, steps
    verifying part of a draft, steps where part of the batch drafts, and prefill chunks, the
    shapes `adactl profile` measures on a real machine."""
    shapes = [whole_batch(r, k, c) for r in PROFILE_ROWS for k in PROFILE_KS for c in PROFILE_CONTEXTS]
    for r in (1, 4, 16, 64, 256):
        for k in (2, 4, 8):
            half = [k] * (r - r // 2) + [k // 2] * (r // 2)  # half the rows verify half their draft
            shapes.append(StepShape.of_lengths(half, [k] * r, 0, r * 512))
            some = [k] * max(1, r // 4) + [0] * (r - max(1, r // 4))  # a quarter of the rows draft
            shapes.append(StepShape.of_lengths(some, some, 0, r * 512))
        for p in (64, 256, 1024):
            shapes.append(StepShape(r, r, 1, 0, 0, p, r * 512))
    shapes += [StepShape(0, 0, 0, 0, 0, p, 0) for p in (16, 64, 256, 1024, 2048)]
    # long prompts in chunks after what is already cached (a 16k prompt is two 8k chunks): a fit
    # on short prompts alone priced the second 8k chunk of a 16k prompt at 5x its physics
    for size in (2048, 4096, 8192):
        for cached in (0, 4096, 8192, 16384):
            pairs = prefill_pairs([(cached, size)])
            shapes.append(StepShape(0, 0, 0, 0, 0, size, 0, prefill_attention=pairs))
            shapes += [StepShape(r, r, 1, 0, 0, size, r * 2048, prefill_attention=pairs) for r in (4, 64)]
    return shapes


def computed_profile(cost: GpuStepCost) -> StepCostProfile:
    """The portable profile of `cost`: its steps, fitted as `adactl profile` fits measured ones."""
    shapes = profile_shapes()
    meta = {"computed": True, "gpu": asdict(cost.gpu), "model": asdict(cost.model), "engine": asdict(cost.engine),
            "tp": cost.tp, "bytes_per_param": cost.bytes_per_param, "knee_tokens": round(cost.knee, 1),
            "weight_ms": round(1000 * cost.weight_s, 3), "calibration_context": CALIBRATION_CONTEXT,
            "note": "computed from the GPU's figures and the model's shape (adactl.estimators.gpu_cost), "
                    "calibrated to published vLLM measurements; not measured"}  # fmt: skip
    # length-aware attention, block tables; the catch-up: the physics prices a chain step's draft, not a lag
    return StepCostProfile.from_steps(cost.fingerprint(), shapes, cost.predict_parts(shapes), meta, nonnegative=False,
                                      held=("kv_span", "kv_moved", "draft_catchup"))  # fmt: skip


def replay_truth(profile: StepCostProfile) -> Any:
    """What a replayed step costs: the physics of a computed profile (`computed_profile`'s
    meta), else the profile's fitted model."""
    m = profile.meta
    if m.get("computed"):
        return GpuStepCost(GPU(**m["gpu"]), ModelShape(**m["model"]), EngineCosts(**m["engine"]), int(m["tp"]),
                           float(m["bytes_per_param"]))  # fmt: skip
    return profile.model(refine=False)


# -------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Point:
    """A published or measured step time the engine costs are fitted on or checked against."""

    gpu: str
    model: str
    batch: int
    k: int  # draft tokens verified per row
    ms: float
    source: str
    whole_step: bool = True  # drafting included; False: the target's forward alone

    def predicted_ms(self, engine: EngineCosts) -> float:
        cost = GpuStepCost(GPUS[self.gpu], MODELS[self.model], engine)
        return cost.plain_ms(self.batch, self.k) if self.whole_step else cost.verify_ms(self.batch, self.k)


# vLLM's dynamic speculative-decoding table for Llama-3.1-8B with EAGLE on an H100 (median
# inter-token latency, ms: one step per token event), and published batch-1 decode steps of
# that model (H100 6.3-6.5 ms, A100 10.5-10.7).
VLLM_TABLE = {0: (6.52, 6.60, 6.90, 7.77, 14.49), 1: (7.37, 7.47, 7.85, 9.66, 27.14),
              3: (8.84, 8.98, 9.52, 13.50, 41.85), 5: (10.33, 10.40, 11.20, 16.83, 57.40)}  # fmt: skip
VLLM_BATCHES = (1, 4, 16, 64, 256)
VLLM_ACCEPTANCE = (0.68, 0.39, 0.20, 0.10, 0.05)  # P(draft position i accepted), as vLLM records it
PUBLISHED = [
    *(Point("h100", "llama-3.1-8b", b, k, ms, "vLLM dynamic SD table (EAGLE)")
      for k, row in VLLM_TABLE.items() for b, ms in zip(VLLM_BATCHES, row)),
    Point("h100", "llama-3.1-8b", 1, 0, 6.4, "published H100 batch-1 decode (6.3-6.5 ms)"),
    Point("a100", "llama-3.1-8b", 1, 0, 10.6, "published A100 batch-1 decode (10.5-10.7 ms)"),
]  # fmt: skip
# ../shared/measurements (h100_transformers_static_graph.json): transformers' own Llama forward
# with a StaticCache of 256 tokens in bf16, captured as a CUDA graph and replayed, on one H100
# (fastest of 20), 1 and 5 tokens per row. Checks, not fitted: another engine, whose forward
# (whole-capacity attention, K and V repeated per query head, 30-32 layers of small kernels)
# costs 1.4-4.4x what the fused engine's does on the 8B shape and 27x on SmolLM2's; the gap
# issue 31 closes (docs/gpu_regime.md).
MEASURED = [
    Point("h100", model, b, k, ms, "H100 measured: transformers forward as a CUDA graph", whole_step=False)
    for model, rows in (("smollm2-135m", ((1, 3.35, 3.83), (16, 4.28, 4.98), (64, 7.31, 8.00))),
                        ("llama-3.1-8b", ((1, 9.35, 10.06), (16, 16.15, 17.18), (64, 34.69, 40.32))))
    for b, one, five in rows for k, ms in ((0, one), (4, five))
]  # fmt: skip
# the engine costs each calibration fits, with their bounds and the scale they are fitted in
_BOUNDS = {"bandwidth_efficiency": (0.3, 1.0, 1.0), "flops_efficiency": (0.05, 1.0, 1.0), "launch_s": (0, 5, 1e-3),
           "row_s": (0, 100, 1e-6), "token_s": (0, 100, 1e-6), "spec_row_s": (0, 200, 1e-6),
           "draft_fraction": (0, 0.5, 1.0), "draft_launch_s": (0, 2, 1e-3)}  # fmt: skip
VLLM_FITTED = ("bandwidth_efficiency", "flops_efficiency", "launch_s", "row_s", "token_s", "spec_row_s",
               "draft_fraction", "draft_launch_s")  # fmt: skip


def calibrate(points: Sequence[Point] = tuple(PUBLISHED), start: EngineCosts | None = None,
              fitted: Sequence[str] = VLLM_FITTED) -> EngineCosts:  # fmt: skip
    """The engine costs (the `fitted` fields of `start`) that fit `points` best in relative
    error: least squares of log ratios, every figure within physical bounds."""
    from scipy.optimize import least_squares

    start = start or VLLM_EAGLE
    low, high, scale = (np.array([_BOUNDS[n][i] for n in fitted], dtype=np.float64) for i in range(3))

    def costs(x: np.ndarray) -> EngineCosts:
        values: dict[str, Any] = dict(zip(fitted, map(float, x * scale)))
        return replace(start, **values)

    def residuals(x: np.ndarray) -> list[float]:
        c = costs(x)
        return [math.log(p.predicted_ms(c) / p.ms) for p in points]

    x0 = np.array([getattr(start, n) for n in fitted]) / scale
    return costs(least_squares(residuals, np.clip(x0, low, high), bounds=(low, high)).x)


def calibration_table(points: Sequence[Point] = tuple(PUBLISHED), engine: EngineCosts = VLLM_EAGLE,
                      profiles: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """Each point next to the model's prediction (`predicted_ms`) and, for whole steps, the
    computed profile's (`profile_ms`: the file's fitted basis and surface, what `--profile`
    consumers read)."""
    models: dict[tuple[str, str], Any] = {}
    rows = []
    for p in points:
        predicted = p.predicted_ms(engine)
        row = {"gpu": p.gpu, "model": p.model, "batch": p.batch, "K": p.k, "engine": engine.name,
               "published_ms": p.ms, "predicted_ms": round(predicted, 2), "error": round(predicted / p.ms - 1, 4),
               "source": p.source}  # fmt: skip
        if profiles and p.whole_step:
            if (p.gpu, p.model) not in models:
                cost = GpuStepCost(GPUS[p.gpu], MODELS[p.model], engine)
                models[p.gpu, p.model] = computed_profile(cost).model(refine=False)
            profiled = 1000 * float(models[p.gpu, p.model].predict([whole_batch(p.batch, p.k)])[0])
            row.update(profile_ms=round(profiled, 2), profile_error=round(profiled / p.ms - 1, 4))
        rows.append(row)
    return rows


def best_k(predict_ms: Any, batch: int, ks: Sequence[int] = (0, 1, 3, 5),
           acceptance: Sequence[float] = VLLM_ACCEPTANCE) -> int:  # fmt: skip
    """The K among `ks` with the most tokens per second at `batch`: (1 + sum_{i<K} acc_i) / T(K)."""
    return max(ks, key=lambda k: (1 + sum(acceptance[:k])) / predict_ms(batch, k))


def flat_batches(cost: GpuStepCost, ks: Sequence[int] = (1, 2, 4), tolerance: float = 0.05,
                 context: int = CALIBRATION_CONTEXT) -> dict[int, int]:  # fmt: skip
    """For each k, the largest batch (1 to 1024) at which a step verifying k + 1 tokens a row
    (target alone, no draft) costs at most `tolerance` more than a plain one: where
    verification is nearly free."""
    flat = {}
    for k in ks:
        ok = [
            b
            for b in range(1, 1025)
            if cost.verify_ms(b, k, context) <= (1 + tolerance) * cost.verify_ms(b, 0, context)
        ]
        flat[k] = max(ok, default=0)
    return flat


# ---------------------------------------------------------------- by name
SHIPPED = {  # name: (GPU, model, tensor-parallel degree)
    "h100-llama-3.1-8b": ("h100", "llama-3.1-8b", 1),
    "a100-llama-3.1-8b": ("a100", "llama-3.1-8b", 1),
    "h200-llama-3.1-8b": ("h200", "llama-3.1-8b", 1),
    "h100x4-llama-3.1-70b": ("h100", "llama-3.1-70b", 4),
}


def _named(table: dict[str, Any], name: str, what: str) -> Any:
    if name in table:
        return table[name]
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise GpuCostError(f"{what} file {path} is not valid JSON ({e})") from None
    raise GpuCostError(f"unknown {what} {name!r}: known are {', '.join(sorted(table))}, or a JSON file of the "
                       f"fields of adactl.estimators.gpu_cost.{'GPU' if what == 'GPU' else 'ModelShape'}")  # fmt: skip


def gpu_cost(gpu: str, model: str, tp: int = 1, draft_fraction: float | None = None) -> GpuStepCost:
    """A `GpuStepCost` by names (`GPUS`, `MODELS`) or JSON files of their fields; one clear error otherwise."""
    parts = []
    for table, name, what, kind in ((GPUS, gpu, "GPU", GPU), (MODELS, model, "model shape", ModelShape)):
        found = _named(table, name, what)
        if isinstance(found, dict):
            try:
                found = kind(**found)
            except TypeError as e:
                raise GpuCostError(
                    f"{what} file {name}: {e}; the fields are {[f.name for f in fields(kind)]}"
                ) from None
        parts.append(found)
    engine = VLLM_EAGLE if draft_fraction is None else replace(VLLM_EAGLE, draft_fraction=draft_fraction)
    return GpuStepCost(parts[0], parts[1], engine, tp)


def shipped_gpu_profile(name: str) -> GpuStepCost:
    """The computed profile shipped under `name` (`SHIPPED`)."""
    if name not in SHIPPED:
        raise GpuCostError(f"unknown GPU profile {name!r}: shipped are {', '.join(SHIPPED)}")
    g, m, tp = SHIPPED[name]
    return gpu_cost(g, m, tp)
