"""The step-cost model of the machine in use: profiles (portable files), online refinement,
and why refinement exists (a controller started from another machine's costs)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from adactl.controllers import FixedDraftLength, GoodputLength
from adactl.estimators import MovingAverage
from adactl.estimators.step_cost import BASIS, Fingerprint, LinearStepCost, ProfileError, StepCostProfile, features
from adactl.estimators.step_time import StepShape
from adactl.loop import ControlLoop
from adactl.runtime import SamplingParams
from adactl.runtime.replay import ReplayEngine

ROW = {name: i for i, name in enumerate(BASIS)}
FP = Fingerprint("t", "d", "none", "cpu", "Test CPU", "float32", "2.13.0", 2)


def machine(overhead_s: float, per_token_s: float, per_row_s: float = 0.0, draft_s: float = 0.002) -> np.ndarray:
    """theta of a machine whose step costs overhead + per token verified + per row (+ drafting)."""
    theta = np.zeros((len(BASIS), 3))
    theta[ROW["step"], 2] = overhead_s
    theta[ROW["verify_tokens"], 2] = per_token_s * 64  # features are scaled: tokens / 64
    theta[ROW["rows"], 2] = per_row_s * 16
    theta[ROW["draft_forwards"], 1] = draft_s * 4
    return theta


CPU_LIKE = machine(0.030, 0.004)  # verification dear: a CPU
GPU_LIKE = machine(0.010, 0.00005, draft_s=0.0005)  # a step costs about the same whatever it verifies


def grid() -> list[StepShape]:
    return [StepShape.of_lengths([k] * b, [k] * b, 0, 200 * b) for b in (1, 2, 4, 8, 16, 32) for k in range(9)]


def relative_error(model: LinearStepCost, truth: LinearStepCost, shapes: list[StepShape]) -> float:
    p, t = model.predict(shapes), truth.predict(shapes)
    return float(np.mean(np.abs(p - t) / t))


def served_shapes(rng: np.random.Generator, n: int) -> list[StepShape]:
    """Shapes a server sees: a batch that drifts, draft lengths that vary (some verify cuts)."""
    out = []
    for _ in range(n):
        b, k = int(rng.integers(1, 17)), int(rng.integers(0, 5))
        cut = [int(rng.integers(0, k + 1)) for _ in range(b)]
        out.append(StepShape.of_lengths(sorted(cut, reverse=True), [k] * b, 0, int(rng.integers(50, 400)) * b))
    return out


def test_fit_recovers_a_linear_machine() -> None:
    truth = LinearStepCost(CPU_LIKE, refine=False)
    shapes = grid()
    seconds = truth.predict_parts(shapes) * np.exp(np.random.default_rng(0).normal(0, 0.03, (len(shapes), 1)))
    profile = StepCostProfile.from_steps(FP, shapes, seconds)
    assert relative_error(profile.model(refine=False), truth, shapes) < 0.05
    assert profile.meta["fit_mape"] < 0.05


def test_online_refinement_converges_from_another_machines_profile_within_50_steps() -> None:
    truth = LinearStepCost(GPU_LIKE, refine=False)
    learned, frozen = LinearStepCost(CPU_LIKE), LinearStepCost(CPU_LIKE, refine=False)
    rng = np.random.default_rng(1)
    assert relative_error(learned, truth, grid()) > 1.0  # the prior is far off
    for shape in served_shapes(rng, 50):
        seconds = truth.predict_parts([shape])[0] * float(np.exp(rng.normal(0, 0.05)))
        learned.observe(shape, seconds)
        frozen.observe(shape, seconds)
    assert relative_error(learned, truth, grid()) < 0.15
    assert relative_error(frozen, truth, grid()) > 1.0  # refine=False keeps the prior
    assert learned.updates == 50 and frozen.updates == 0


def test_online_update_costs_well_under_a_millisecond() -> None:
    """The issue's budget is 0.1 ms a step; measured about 0.06 ms (update from a real record,
    the shape included) with the other core busy. The bound leaves room for a loaded CI."""
    model = LinearStepCost(CPU_LIKE)
    shapes = served_shapes(np.random.default_rng(2), 400)
    times = []
    for s in shapes:
        start = time.perf_counter()
        model.observe(s, (0.0, 0.002, 0.03))
        times.append(time.perf_counter() - start)
    assert float(np.median(times)) < 3e-4, np.median(times)


def test_profile_file_round_trip_and_bad_files(tmp_path) -> None:
    shapes = grid()
    profile = StepCostProfile.from_steps(FP, shapes, LinearStepCost(CPU_LIKE).predict_parts(shapes), {"x": 1})
    path = profile.save(tmp_path / "p.json")
    back = StepCostProfile.load(path)
    assert back.fingerprint == FP and np.allclose(back.theta, profile.theta) and len(back.steps) == len(shapes)
    assert back.shapes()[0] == shapes
    data = json.loads(path.read_text())
    cases = {
        "corrupt.json": "{not json",
        "foreign.json": json.dumps({"hello": 1}),
        "version.json": json.dumps({**data, "version": 99}),
        "basis.json": json.dumps({**data, "basis": ["step"]}),
        "theta.json": json.dumps({**data, "theta": [[1.0]]}),
        "nan.json": json.dumps({**data, "theta": [[float("nan")] * 3] * len(BASIS)}),
        "steps.json": json.dumps({**data, "steps": [{"rows": 1}]}),
        "fingerprint.json": json.dumps({**data, "fingerprint": {"target": "x"}}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ProfileError, match="adactl profile"):
            StepCostProfile.load(tmp_path / name)
    with pytest.raises(ProfileError, match="does not exist"):
        StepCostProfile.load(tmp_path / "missing.json")


def test_features_are_finite_for_empty_and_prefill_only_steps() -> None:
    phi = features([StepShape(0, 0, 0, 0, 0, 128, 0), StepShape.of_lengths([], [], 0, 0)])
    assert np.isfinite(phi).all() and phi.shape == (2, len(BASIS))


def test_profile_command_caches_and_a_foreign_profile_is_never_silent(tmp_path, monkeypatch, capsys) -> None:
    from adactl.cli import main
    from adactl.profiler import cached_path, fingerprint, step_cost_for, tiny_pair

    monkeypatch.setenv("ADACTL_CACHE", str(tmp_path))
    assert main(["profile", "--tiny", "--device", "cpu", "--max-batch", "8", "--budget-s", "20",
                 "--out", str(tmp_path / "mine.json")]) == 0  # fmt: skip
    pair = tiny_pair()
    here = fingerprint(pair.model_ids, pair.device, pair.dtype)
    assert cached_path(here).is_file()
    said: list[str] = []
    model = step_cost_for(pair, log=said.append)  # the cached one: nothing measured, nothing said
    assert said == [] and isinstance(model, LinearStepCost)
    foreign = StepCostProfile.load(tmp_path / "mine.json")
    foreign.fingerprint = Fingerprint(**{**foreign.fingerprint.__dict__, "device_type": "cuda",
                                         "device_name": "NVIDIA H100 80GB HBM3"})  # fmt: skip
    foreign.save(tmp_path / "h100.json")
    step_cost_for(pair, tmp_path / "h100.json", log=said.append)
    assert len(said) == 1 and "NVIDIA H100" in said[0] and "device_type" in said[0]
    assert main(["profile", "--tiny", "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err


def run_goodput(truth: LinearStepCost, prior: np.ndarray | None, refine: bool, k: int | None = None,
                alpha: float = 0.6) -> float:  # fmt: skip
    """Tokens per replayed second at batch 8 of GoodputLength (from `prior`) or fixed k, on a
    replay engine whose steps cost what `truth` says."""
    engine = ReplayEngine(truth, alpha=[alpha] * 8, max_batch_size=8, seed=0)
    for _ in range(8):
        engine.add_request(64, SamplingParams(max_new_tokens=600, stop_on_eos=False))
    if k is None:
        controller = GoodputLength(LinearStepCost(prior, refine=refine), MovingAverage(prior=alpha))
    else:
        controller = FixedDraftLength(k)
    loop = ControlLoop(engine, [controller], max_draft_len=8, clock=engine.clock)
    results = loop.run()
    return sum(len(r.output_ids) for r in results.values()) / engine.now


@pytest.mark.parametrize(("truth", "prior"), [(GPU_LIKE, CPU_LIKE), (CPU_LIKE, GPU_LIKE)], ids=["on-gpu", "on-cpu"])
def test_refinement_is_what_makes_another_machines_profile_work(truth: np.ndarray, prior: np.ndarray) -> None:
    """Started from the other machine's costs: with refinement goodput reaches the best fixed
    k (measured 0.97x and 0.98x); without it, it keeps the other machine's crossover (0.61x:
    thinks verification dear, drafts too little; 0.89x: thinks it cheap, drafts too much)."""
    machine = LinearStepCost(truth, refine=False)
    best_fixed = max(run_goodput(machine, None, False, k) for k in range(9))
    refined = run_goodput(machine, prior, refine=True)
    stale = run_goodput(machine, prior, refine=False)
    own = run_goodput(machine, truth, refine=True)
    assert own >= 0.95 * best_fixed
    assert refined >= 0.95 * best_fixed
    assert stale < 0.95 * best_fixed and stale < refined


@pytest.mark.parametrize("prior", [CPU_LIKE, GPU_LIKE])
def test_loop_updates_a_shared_cost_model_once_per_step(prior: np.ndarray) -> None:
    truth = LinearStepCost(GPU_LIKE, refine=False)
    engine = ReplayEngine(truth, alpha=[0.7] * 4, max_batch_size=4, seed=0)
    for _ in range(4):
        engine.add_request(16, SamplingParams(max_new_tokens=20, stop_on_eos=False))
    cost = LinearStepCost(prior)
    loop = ControlLoop(engine, [GoodputLength(cost, MovingAverage())], estimators=[cost], max_draft_len=4,
                       clock=engine.clock)  # fmt: skip
    loop.run()
    assert cost.updates == loop.steps - 1 or cost.updates == loop.steps  # the last step may have no decode rows
    assert not loop.fallbacks


def test_shipped_cpu_profiles_load() -> None:
    from adactl.runtime.models import SHIPPED_MODELS

    files = sorted((SHIPPED_MODELS / "estimators").glob("step_cost_*.json"))
    assert files, "no shipped step-cost profile"
    for f in files:
        profile = StepCostProfile.load(f)
        assert profile.fingerprint.device_type in ("cpu", "cuda") and profile.meta["fit_mape"] < 0.5
        assert ("h100" in f.name) == (profile.fingerprint.device_type == "cuda")
        assert np.isfinite(profile.model().predict(grid())).all()
    assert torch.get_num_threads() >= 1
