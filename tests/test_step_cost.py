"""The step-cost model of the machine in use: profiles (portable files), online refinement,
and why refinement exists (a controller started from another machine's costs)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from adactl.controllers import FixedDraftLength, GoodputLength
from adactl.estimators import MovingAverage
from adactl.estimators.cost_surface import SIZE, VECTOR_FROM, at_shapes, basis
from adactl.estimators.step_cost import BASIS, Fingerprint, ProfileError, StepCostModel, StepCostProfile, features
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


def relative_error(model: StepCostModel, truth: StepCostModel, shapes: list[StepShape]) -> float:
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
    truth = StepCostModel(CPU_LIKE, refine=False)
    shapes = grid()
    seconds = truth.predict_parts(shapes) * np.exp(np.random.default_rng(0).normal(0, 0.03, (len(shapes), 1)))
    profile = StepCostProfile.from_steps(FP, shapes, seconds)
    assert relative_error(profile.model(refine=False), truth, shapes) < 0.05
    assert profile.meta["fit_mape"] < 0.05


def whole_batch_shapes(rng: np.random.Generator, n: int) -> list[StepShape]:
    """Whole-batch steps of a server whose batch drifts and whose draft length varies."""
    return [StepShape.of_lengths([k] * b, [k] * b, 0, int(rng.integers(50, 400)) * b)
            for b, k in zip(rng.integers(1, 17, n), rng.integers(0, 5, n))]  # fmt: skip


def test_a_profiles_cells_pair_each_length_with_its_rounds_plain_step() -> None:
    """A profile measures a batch size in rounds spread over its run, and the machine's speed
    moves between them. Here it slows by 20% a round, and one round's plain step is slow
    (the CPU does that now and then): medians per cell, as the fit took them before, put
    k = 1 at the same cost as plain decoding; each round's k-step against its own plain
    step gives the 22% the machine pays (make bench runs 38-43's profiles against 12
    held-out checks: 15 of 252 ratios beyond 5% -> 6, docs/issue30/paired_cells)."""
    from adactl.estimators.cost_surface import cell_values

    plain = StepShape.of_lengths([0] * 8, [0] * 8, 0, 8 * 200)
    one = StepShape.of_lengths([1] * 8, [1] * 8, 0, 8 * 200)
    levels, slow = [0.0, 0.2, 0.4, 0.6], [0.0, 0.5, 0.0, 0.0]
    shapes, residuals = [], []
    for level, extra in zip(levels, slow):
        shapes += [plain, one, StepShape.of_lengths([1, 0], [1, 0], 16, 300)]  # a round, then a prefill between
        residuals += [level + extra, level + 0.2, 0.0]
    cells = {s.max_draft: v for s, v, _ in cell_values(shapes, np.array(residuals))}
    assert cells[1] - cells[0] == pytest.approx(0.2)
    medians = np.median([r for s, r in zip(shapes, residuals) if s == one]) - np.median(residuals[0::3])
    assert medians == pytest.approx(0.0)  # what the fit said before

    seconds = np.zeros((len(shapes), 3))
    seconds[:, 2] = 0.05 * np.exp(residuals) * np.array([1.0 if s == plain else 1.5 for s in shapes])
    model = StepCostProfile.from_steps(FP, shapes, seconds).model(refine=False)
    predicted = model.predict([one])[0] / model.predict([plain])[0]
    assert predicted == pytest.approx(1.5 * math.exp(0.2), rel=0.03)
    # a size with no plain step in any round: its cells are their steps' medians
    lone = [StepShape.of_lengths([2] * 4, [2] * 4, 0, 800)] * 3
    assert cell_values(lone, np.array([0.1, 0.5, 0.2]))[0][1:] == (pytest.approx(0.2), 3)


def test_online_refinement_converges_from_another_machines_profile_within_50_steps() -> None:
    """Where it serves: within 8% after 50 whole-batch steps (measured 5.7%) from a profile
    more than twice off; where it never served (batch 32, drafts of 5 to 8), the levels it
    learned carry over, the rest stays the profile's (measured 49% off, against 1,300%)."""
    truth = StepCostModel(GPU_LIKE, refine=False)
    learned, frozen = StepCostModel(CPU_LIKE), StepCostModel(CPU_LIKE, refine=False)
    rng = np.random.default_rng(1)
    served = [whole_batch(b, k, 200 * b) for b in (1, 2, 4, 8, 16) for k in range(5)]
    assert relative_error(learned, truth, served) > 1.0  # the prior is far off
    for shape in whole_batch_shapes(rng, 50):
        seconds = truth.predict_parts([shape])[0] * float(np.exp(rng.normal(0, 0.05)))
        learned.observe(shape, seconds)
        frozen.observe(shape, seconds)
    assert relative_error(learned, truth, served) < 0.08
    assert relative_error(learned, truth, grid()) < 0.6 < relative_error(frozen, truth, grid())
    assert relative_error(frozen, truth, served) > 1.0  # refine=False keeps the prior
    assert learned.updates == 50 and frozen.updates == 0


def test_online_update_costs_well_under_a_millisecond() -> None:
    """The issue's budget is 0.1 ms a step; measured about 0.06 ms (update from a real record,
    the shape included) with the other core busy. The bound leaves room for a loaded CI."""
    model = StepCostModel(CPU_LIKE)
    shapes = served_shapes(np.random.default_rng(2), 400)
    times = []
    for s in shapes:
        start = time.perf_counter()
        model.observe(s, (0.0, 0.002, 0.03))
        times.append(time.perf_counter() - start)
    assert float(np.median(times)) < 3e-4, np.median(times)


def test_profile_file_round_trip_and_bad_files(tmp_path) -> None:
    shapes = grid()
    profile = StepCostProfile.from_steps(FP, shapes, StepCostModel(CPU_LIKE).predict_parts(shapes), {"x": 1})
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
    # a profile of the basis before the KV read, prefilling, span, moved and catch-up terms: they cost nothing,
    # the rest as written
    theta = np.array(data["theta"])
    theta[-5:] = 0.0
    old = {**data, "basis": list(BASIS[:-5]), "theta": theta[:-5].tolist()}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = StepCostProfile.load(tmp_path / "old.json")
    assert np.array_equal(loaded.theta, theta)
    assert BASIS[-5:] == ("kv_read", "prefilling", "kv_span", "kv_moved", "draft_catchup")
    same = StepCostProfile(FP, profile.steps, theta, {})
    assert np.allclose(loaded.model(refine=False).predict(shapes), same.model(refine=False).predict(shapes))


def test_features_are_finite_for_empty_and_prefill_only_steps() -> None:
    phi = features([StepShape(0, 0, 0, 0, 0, 128, 0), StepShape.of_lengths([], [], 0, 0)])
    assert np.isfinite(phi).all() and phi.shape == (2, len(BASIS))


def test_a_profile_cached_by_another_engine_version_is_measured_again(tmp_path, monkeypatch) -> None:
    """The cache is keyed by the engine's source as well as the machine: after an upgrade, the
    first run measures the engine it runs, not the old one's steps."""
    import adactl.profiler as profiler

    monkeypatch.setenv("ADACTL_CACHE", str(tmp_path))
    pair = profiler.tiny_pair()
    said: list[str] = []
    profiler.step_cost_for(pair, max_batch=2, budget_s=2, log=said.append)
    assert len(said) == 2 and "measuring" in said[0] and "rounds at each batch size" in said[1]  # and how precise
    profiler.step_cost_for(pair, max_batch=2, budget_s=2, log=said.append)
    assert len(said) == 2  # cached
    monkeypatch.setattr(profiler, "engine_version", lambda: "upgraded")
    profiler.step_cost_for(pair, max_batch=2, budget_s=2, log=said.append)
    assert len(said) == 4 and "measuring" in said[2]
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2


def test_profile_command_caches_and_a_foreign_profile_is_never_silent(tmp_path, monkeypatch, capsys) -> None:
    from adactl.cli import main
    from adactl.profiler import cached_path, engine_version, fingerprint, step_cost_for, tiny_pair

    monkeypatch.setenv("ADACTL_CACHE", str(tmp_path))
    assert main(["profile", "--tiny", "--device", "cpu", "--max-batch", "8", "--budget-s", "20",
                 "--out", str(tmp_path / "mine.json")]) == 0  # fmt: skip
    pair = tiny_pair()
    here = fingerprint(pair.model_ids, pair.device, pair.dtype)
    assert cached_path(here).is_file() and engine_version() in cached_path(here).name
    assert StepCostProfile.load(cached_path(here)).meta["engine"] == engine_version()
    said: list[str] = []
    model = step_cost_for(pair, log=said.append)  # the cached one: nothing measured, nothing said
    assert said == [] and isinstance(model, StepCostModel)
    foreign = StepCostProfile.load(tmp_path / "mine.json")
    foreign.fingerprint = Fingerprint(**{**foreign.fingerprint.__dict__, "device_type": "cuda",
                                         "device_name": "NVIDIA H100 80GB HBM3"})  # fmt: skip
    foreign.save(tmp_path / "h100.json")
    step_cost_for(pair, tmp_path / "h100.json", log=said.append)
    assert len(said) == 1 and "NVIDIA H100" in said[0] and "device_type" in said[0]
    assert main(["profile", "--tiny", "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
    # --check: held-out whole-batch steps against the cached profile's ratios, measured nothing new
    assert main(["profile", "--tiny", "--device", "cpu", "--check", "--check-batches", "1,4", "--check-ks", "1,2",
                 "--check-rounds", "2", "--out", str(tmp_path / "check.json")]) == 0  # fmt: skip
    records = json.loads((tmp_path / "check.json").read_text())["records"]
    assert [(r["batch_size"], r["k"]) for r in records] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    assert all(r["measured_ratio"] > 0 and np.isfinite(r["error"]) and r["stderr"] >= 0 for r in records)
    out = capsys.readouterr().out
    assert "largest error of the predicted T(k) / T(0)" in out and "errors beyond twice it" in out
    assert "an exact profile, on this check's noise" in out
    # two profiles side by side: priced on the very same held-out steps
    assert main(["profile", "--tiny", "--device", "cpu", "--check", "--check-batches", "4", "--check-ks", "2",
                 "--check-rounds", "2", "--profile", "this,shipped",
                 "--out", str(tmp_path / "both.json")]) == 0  # fmt: skip
    mine, theirs = json.loads((tmp_path / "both.json").read_text())["records"]
    assert (mine["profile"], theirs["profile"]) == ("this", "shipped")
    assert mine["measured_ratio"] == theirs["measured_ratio"] and mine["predicted_ratio"] != theirs["predicted_ratio"]
    assert capsys.readouterr().out.count("largest error of the predicted") == 2


def test_a_check_says_how_many_ratios_an_exact_profile_would_put_within_5_percent() -> None:
    """`exact_within`: a check whose ratios are measured with standard error se (in log) puts an exact profile's
    ratio within 5% as often as a simulation of such measurements does; every ratio where the check has no noise,
    about 69% of them at the 4.9% of the AMD EPYC's checks (14.5 of 21), few where the noise is far wider."""
    from adactl.profiler import exact_within

    se = np.array([0.01, 0.03, 0.049, 0.1, 0.2])
    measured = np.exp(np.random.default_rng(0).normal(0.0, se, (200_000, len(se))))  # the truth is 1
    simulated = (np.abs(1.0 / measured - 1.0) <= 0.05).mean(0)  # the check's error: predicted / measured - 1
    for s, p in zip(se, simulated):
        assert exact_within([{"stderr": s}]) == pytest.approx(p, abs=0.005)
    assert exact_within([{"stderr": s} for s in se]) == pytest.approx(simulated.sum(), abs=0.01)
    assert exact_within([{"stderr": 0.0}] * 21) == pytest.approx(21.0)
    assert exact_within([{"stderr": 0.049}] * 21) == pytest.approx(14.5, abs=0.2)
    assert exact_within([{"stderr": 0.049}] * 21, tolerance=0.10) > 19.5  # 20.1


def test_a_measured_profile_is_fitted_with_costs_that_are_not_negative() -> None:
    """A profiler's batch grows by younger, shorter rows, so rows and context per row move
    together; the fit must not explain that with terms that cancel (issue 32: a plain CPU
    profile so fitted priced a streaming run's shorter-context steps 25% low)."""
    from adactl.estimators.step_cost import fit_theta

    rng = np.random.default_rng(0)
    shapes = [StepShape.of_lengths(torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long), 0,
                                   b * (int(300 / (1 + 0.2 * math.log2(b))) + 10 * r))
              for b in (1, 2, 4, 8, 16, 32, 64) for r in range(6)]  # fmt: skip
    truth = np.array([0.06 + 0.08 * (s.rows > 1) + 0.004 * s.rows for s in shapes])
    noisy = truth * np.exp(rng.normal(0, 0.1, len(shapes)))
    seconds = np.stack([np.zeros(len(shapes)), np.zeros(len(shapes)), noisy], 1)
    assert (fit_theta(shapes, seconds, nonnegative=False) < -1e-3).any()  # least squares cancels terms here
    theta = fit_theta(shapes, seconds)
    assert (theta >= 0).all() and StepCostProfile.from_steps(FP, shapes, seconds).theta.min() >= 0


def test_a_prefill_chunk_is_priced_by_its_size_not_by_the_rows_beside_it() -> None:
    """A streaming run's own steps (issue 32): the engine prefills a step's prompt chunks as a
    forward of their own, 0.15 s whatever its size plus 3 ms a token, beside decode rows whose
    steps at 1-4 rows run 1.5x what the linear basis says (a cell of the profile's surface).
    The fit must price a 40-token and a 330-token chunk each within 10%: without a term for a
    prefill forward's fixed cost it priced them at 0.6x and 1.3x, and with the surface applied
    to the prefill part, a chunk beside 2 rows at 1.5x; a replay that merged arrivals into
    fewer, larger chunks then paid more for them than the engine (TTFT p50 1.3-3x at loads 3-5)."""
    rng = np.random.default_rng(0)
    shapes, seconds = [], []
    for b in range(1, 33):
        for prefill in (0, 0, 0, int(rng.integers(16, 440))):
            shape = StepShape.of_lengths(torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long),
                                         prefill, b * 200)  # fmt: skip
            verify = (0.05 + 0.01 * b) * (1.5 if b <= 4 else 1.0)
            chunk = 0.15 + 0.003 * prefill if prefill else 0.0
            shapes.append(shape)
            seconds.append(np.array([chunk, 0.0, verify]) * math.exp(rng.normal(0, 0.05)))
    model = StepCostProfile.from_steps(FP, shapes, np.array(seconds)).model(refine=False)
    for rows in (2, 16):
        for prefill in (40, 330):
            shape = StepShape.of_lengths(torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long),
                                         prefill, rows * 200)  # fmt: skip
            priced = float(model.predict_parts([shape])[0, 0])
            assert priced == pytest.approx(0.15 + 0.003 * prefill, rel=0.1), (rows, prefill)


def test_a_step_is_priced_by_its_longest_row_not_by_its_mean_context() -> None:
    """The engine's attention spans the widest row of the batch (issue 32). A profile's rounds
    run the first b rows, which always hold one of the oldest, and its span steps run the b
    youngest and the b oldest (`adactl.profiler.measure`). Fitted on such steps, the basis with
    the KV span prices a server's rows (short ones, with and without one long one beside them)
    within 5%; the summed context alone (the basis before, fitted on the same steps) over 10%
    off: it priced a streaming run's decode steps 15% low on the 2-core CPU."""
    from adactl.estimators.step_cost import fit_theta
    from adactl.runtime.shapes import context_of

    assert context_of(torch.tensor([10, 100, 40])) == (150, 300) and context_of([]) == (0, 0)

    def truth(shape: StepShape) -> float:  # a plain step: fixed, per row, per token of span
        return 0.02 + 0.003 * shape.rows + 3e-6 * shape.span_tokens

    def plain(contexts: np.ndarray) -> StepShape:
        context, span = context_of(contexts)
        return StepShape.of_lengths([0] * len(contexts), [0] * len(contexts), 0, context, span=span)

    rng = np.random.default_rng(1)
    shapes = []
    for _ in range(6):  # rounds over 64 rows of 16-384 tokens, oldest first
        ages = np.sort(rng.integers(16, 384, size=64))[::-1]
        for b in (1, 2, 4, 8, 16, 32, 64):
            shapes.append(plain(ages[:b]))
            shapes += [plain(ages[-b:]), plain(ages[:b])] if 2 * b <= 64 else []  # the span steps
    seconds = np.array([[0.0, 0.0, truth(s) * math.exp(rng.normal(0, 0.02))] for s in shapes])
    held_out = [
        plain(np.array([*rng.integers(60, 180, size=b - 1), long])) for b in (4, 8, 16, 32) for long in (150, 400)
    ]
    want = np.array([truth(s) for s in held_out])

    def error(held: tuple[str, ...]) -> float:
        theta = fit_theta(shapes, seconds, held=held)
        return float(np.max(np.abs((features(held_out) @ theta).sum(1) / want - 1)))

    assert error(()) < 0.05 and error(("kv_span",)) > 0.10
    with pytest.raises(ValueError, match="not in the cost basis"):
        fit_theta(shapes, seconds, held=("kv_spam",))


def test_the_profiler_measures_every_batch_size_across_the_whole_run() -> None:
    """Each batch size's rounds are spread over the measurement (shuffled passes over every
    size after the batch has grown), so a size is not priced by a few seconds of its own."""
    from adactl.profiler import measure, tiny_pair
    from adactl.runtime import Engine, EngineConfig
    from adactl.runtime.models import output_vocab_size

    pair = tiny_pair()
    engine = Engine(pair.target.model, pair.speculator(), config=EngineConfig(max_batch_size=4, seed=0))
    shapes, seconds = measure(engine, torch.device("cpu"), output_vocab_size(pair.target.model), max_batch=4,
                              budget_s=120, reps=3, min_rounds=3, batch_seconds=1e-3, progress=False)  # fmt: skip
    assert seconds.shape == (len(shapes), 3) and np.all(seconds >= 0)
    plain = [(i, s) for i, s in enumerate(shapes) if s.prefill_tokens == 0]  # decode steps (the rounds' and more)
    at = {b: [i for i, s in plain if s.rows == b] for b in (1, 2, 4)}
    # 3 rounds of every draft length 0, 1, 2, 3, 4, 6, 8 (none partial at one row), and in the two rounds after
    # the batch grew, the span steps: the youngest and the oldest row, each then with its row swapped; each round
    # ends with 4 or 16 plain steps and one drafting, which catches up on them
    lagging = [i for i in at[1] if shapes[i].catchup_tokens >= 4]
    assert len(lagging) == 3 and all(shapes[i].max_draft == 1 for i in lagging)
    assert len(at[1]) - (3 * 7 + 2 * 4 + 3) in {4 * a + 16 * (3 - a) for a in range(4)}
    assert sum(shapes[i].moved_tokens > 0 for i in at[1]) >= 2 * 2
    assert all(len(at[b]) >= 3 * 7 for b in (2, 4))
    assert max(at[1]) > min(at[4]) and max(at[2]) > min(at[4])  # the small batches ran again after the large one
    assert not engine.has_unfinished()


def test_a_ratios_standard_error_comes_from_its_rounds_spread() -> None:
    """`ratio_se`: 1.25 σ / √n of the rounds' log ratios, σ pooled over the draft lengths (each
    around its own mean); infinite below two rounds, 0 where no round drafted."""
    from adactl.profiler import ratio_se

    rng = np.random.default_rng(0)
    rounds = [{1: 1.6 * math.exp(rng.normal(0, 0.1)), 4: 2.9 * math.exp(rng.normal(0, 0.1))} for _ in range(400)]
    assert ratio_se(rounds) == pytest.approx(1.2533 * 0.1 / 20, rel=0.1)
    assert ratio_se(rounds[:100]) == pytest.approx(2 * ratio_se(rounds), rel=0.25)
    assert ratio_se(rounds[:1]) == math.inf and ratio_se([]) == math.inf
    assert ratio_se([{}, {}]) == 0.0


def test_the_profiler_adds_rounds_until_its_ratios_are_resolved_and_keeps_its_minimum_past_the_budget() -> None:
    """Past `min_rounds`, a batch size gets rounds while its ratios' standard error exceeds
    `target_se`, up to `reps`; the minimum is measured even when the budget is spent (a slow VM
    left run 57's profile 3 rounds at batch 8-64, short of the 4 it promised); the rounds and
    the precision each size reached come back in `stats`."""
    from adactl.profiler import measure, tiny_pair
    from adactl.runtime import Engine, EngineConfig

    pair = tiny_pair()

    def rounds(**kwargs):
        engine = Engine(pair.target.model, pair.speculator(), config=EngineConfig(max_batch_size=2, seed=0))
        stats: dict = {}
        measure(engine, torch.device("cpu"), 256, max_batch=2, progress=False, stats=stats, **kwargs)
        assert set(stats["ratio_se"]) == set(stats["rounds"])
        return stats

    never = rounds(budget_s=120, reps=5, min_rounds=2, target_se=0.0)  # never precise enough: every size to reps
    assert never["rounds"] == {1: 5, 2: 5} and all(0 < se < math.inf for se in never["ratio_se"].values())
    loose = rounds(budget_s=120, reps=5, min_rounds=2, target_se=math.inf)  # resolved at once: the minimum
    assert loose["rounds"] == {1: 2, 2: 2}
    spent = rounds(budget_s=1e-6, reps=5, min_rounds=3, target_se=0.0)  # no time at all: batch 1, its minimum
    assert spent["rounds"] == {1: 3}


def test_the_step_after_a_pack_is_not_in_the_profile() -> None:
    """Each round starts from a packed cache, and the first step after `Engine.pack` is slower
    (plain steps at batch 2: 40 against 36 ms, 44-48 in the profiles of make bench runs 24-25,
    where that step was a round's plain one in half the rounds, pricing k-token steps at batch 2
    6-15% too cheap against held-out steps): an untimed step pays for it."""
    from adactl.profiler import measure, tiny_pair
    from adactl.runtime import Engine, EngineConfig

    pair = tiny_pair()
    engine = Engine(pair.target.model, pair.speculator(), config=EngineConfig(max_batch_size=4, seed=0))
    pack, verify = engine.pack, engine.verify
    after_pack: list[float] = []
    timed: list[float] = []
    packed = [False]

    def spy_pack() -> bool:
        packed[0] = True
        return pack()

    def spy_verify(*args, **kwargs):
        outcome = verify(*args, **kwargs)
        (after_pack if packed[0] else timed).append(outcome.verify_s)
        packed[0] = False
        return outcome

    engine.pack, engine.verify = spy_pack, spy_verify  # type: ignore[method-assign]
    _, seconds = measure(engine, torch.device("cpu"), 256, max_batch=4, budget_s=120, reps=3, min_rounds=3,
                         batch_seconds=1e-3, progress=False)  # fmt: skip
    assert len(after_pack) >= 3 * 3  # a pack before every round
    recorded = set(seconds[:, 2].tolist())
    assert not recorded & set(after_pack) and len(recorded & set(timed)) > 3 * 3 * 7


def test_the_profiler_replaces_requests_whose_context_fills_up() -> None:
    """A small model's context fills up when many rounds fit in the budget (a fast machine):
    the rows that end are replaced and each round runs the rows still running, where before a
    round named an ended request and the whole profile failed (a fresh clone on an AVX-512 CPU)."""
    from adactl.profiler import measure
    from adactl.runtime import Engine, EngineConfig, FeatureDraft
    from adactl.runtime.models import tiny_llama

    target = tiny_llama(vocab_size=256, max_positions=300)
    draft = FeatureDraft.from_target(target, list(range(192)), 64, seed=1).eval()
    engine = Engine(target, draft, config=EngineConfig(max_batch_size=4, seed=0))
    shapes, seconds = measure(engine, torch.device("cpu"), 256, max_batch=4, budget_s=120, reps=6, min_rounds=6,
                              batch_seconds=1e-3, progress=False)  # fmt: skip
    assert seconds.shape == (len(shapes), 3) and len(shapes) > 100 and not engine.has_unfinished()
    full = [s.context_tokens / s.rows for s in shapes if s.rows and s.prefill_tokens == 0]
    assert max(full) > 250  # rows ran up to their context's end (and were replaced)


def test_the_profiler_renews_rows_past_max_context() -> None:
    """A row whose context passes `max_context` is replaced before the next round: a step's
    attention spans the cache's widest row, so rows left to age would price every step at
    contexts no server batch of short requests holds (issue 30, docs/issue30/width)."""
    from adactl.profiler import measure
    from adactl.runtime import Engine, EngineConfig, FeatureDraft
    from adactl.runtime.models import tiny_llama

    target = tiny_llama(vocab_size=256, max_positions=300)
    draft = FeatureDraft.from_target(target, list(range(192)), 64, seed=1).eval()
    engine = Engine(target, draft, config=EngineConfig(max_batch_size=4, seed=0))
    shapes, _ = measure(engine, torch.device("cpu"), 256, max_batch=4, budget_s=120, reps=6, min_rounds=6,
                        batch_seconds=1e-3, progress=False, max_context=48)  # fmt: skip
    decode = [s for s in shapes if s.rows and s.prefill_tokens == 0]
    prefills = [s for s in shapes if s.prefill_tokens]
    # a round adds at most 2 (its untimed first step) + 1 + 2 + 3 + 4 + 5 + 7 + 9 tokens to a row: past that,
    assert max(s.context_tokens / s.rows for s in decode) <= 48 + 33  # a row was kept too long
    assert sum(s.prefill_tokens for s in prefills) > 4 * 32  # rows were renewed (4 prompts of <= 32 at the start)
    assert not engine.has_unfinished()


def run_goodput(truth: StepCostModel, prior: np.ndarray | None, refine: bool, k: int | None = None,
                alpha: float = 0.6) -> float:  # fmt: skip
    """Tokens per replayed second at batch 8 of GoodputLength (from `prior`) or fixed k, on a
    replay engine whose steps cost what `truth` says."""
    engine = ReplayEngine(truth, alpha=[alpha] * 8, max_batch_size=8, seed=0)
    for _ in range(8):
        engine.add_request(64, SamplingParams(max_new_tokens=600, stop_on_eos=False))
    if k is None:
        controller = GoodputLength(StepCostModel(prior, refine=refine), MovingAverage(prior=alpha))
    else:
        controller = FixedDraftLength(k)
    loop = ControlLoop(engine, [controller], max_draft_len=8, clock=engine.clock)
    results = loop.run()
    return sum(len(r.output_ids) for r in results.values()) / engine.now


@pytest.mark.parametrize(("truth", "prior"), [(GPU_LIKE, CPU_LIKE), (CPU_LIKE, GPU_LIKE)], ids=["on-gpu", "on-cpu"])
def test_refinement_is_what_makes_another_machines_profile_work(truth: np.ndarray, prior: np.ndarray) -> None:
    """Started from the other machine's costs: with refinement goodput nears the best fixed k;
    without it, it keeps the other machine's crossover (0.61x: thinks verification dear,
    drafts too little; 0.89x: thinks it cheap, drafts too much). Measured 0.99x and 0.99x
    (0.98x and 0.99x, the mean of three seeds); recursive least squares over the
    basis, which this replaced, reached 0.97x and 0.98x here, where the machines are exactly
    linear in its basis, and misled goodput on the real CPU, which is not (issue 30): ratios
    are now learned only from whole-batch steps of the lengths served and probed, so
    climbing from a far-off prior takes probes."""
    machine = StepCostModel(truth, refine=False)
    best_fixed = max(run_goodput(machine, None, False, k) for k in range(9))
    refined = run_goodput(machine, prior, refine=True)
    stale = run_goodput(machine, prior, refine=False)
    own = run_goodput(machine, truth, refine=True)
    assert own >= 0.95 * best_fixed
    assert refined >= 0.95 * best_fixed
    assert stale < 0.95 * best_fixed and stale < refined


@pytest.mark.parametrize("prior", [CPU_LIKE, GPU_LIKE])
def test_loop_updates_a_shared_cost_model_once_per_step(prior: np.ndarray) -> None:
    truth = StepCostModel(GPU_LIKE, refine=False)
    engine = ReplayEngine(truth, alpha=[0.7] * 4, max_batch_size=4, seed=0)
    for _ in range(4):
        engine.add_request(16, SamplingParams(max_new_tokens=20, stop_on_eos=False))
    cost = StepCostModel(prior)
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


# ------------------------------------------- a server's phases, replayed (issue 30)
CPU_PROFILE = "step_cost_cpu.json"


def shipped_cpu_profile() -> StepCostProfile:
    from adactl.runtime.models import SHIPPED_MODELS

    return StepCostProfile.load(SHIPPED_MODELS / "estimators" / CPU_PROFILE)


def whole_batch(rows: int, k: int, context: int) -> StepShape:
    return StepShape.of_lengths([k] * rows, [k] * rows, 0, context)


def ratio_errors(model: object, truth: object, batches: tuple[int, ...], ks: tuple[int, ...]) -> dict:
    """{(batch, k): relative error of the predicted T(k) / T(0)} at a typical context."""
    errors = {}
    for b in batches:
        shapes = [whole_batch(b, k, 250 * b) for k in (0, *ks)]
        p, t = model.predict(shapes), truth.predict(shapes)  # type: ignore[attr-defined]
        for i, k in enumerate(ks, start=1):
            errors[(b, k)] = abs((p[i] / p[0]) / (t[i] / t[0]) - 1)
    return errors


def wrong_choices(model: object, truth: object, alpha: torch.Tensor, batches: tuple[int, ...]) -> dict:
    """{batch: (goodput's k, the truth's k)} wherever the truth's best beats every other k by > 5%."""
    from adactl.controllers.goodput import goodput_length, goodput_rates

    wrong = {}
    for b in batches:
        rates = goodput_rates(truth, alpha, b, 250 * b)  # type: ignore[arg-type]
        best = int(np.argmax(rates))
        if rates[best] > 1.05 * np.delete(rates, best).max():
            chosen = goodput_length(model, alpha, b, 250 * b, margin=0.0)  # type: ignore[arg-type]
            if chosen != best:
                wrong[b] = (chosen, best)
    return wrong


def serve_phase(cost: object, truth: object, batch: int, alpha: list[float], seed: int, drift: float) -> int:
    """One phase of a server's load: runs of plain decoding, fixed k = 1, 2, 4 and goodput at
    one batch size, one run after another with goodput between fixed runs (as `adactl bench spec
    --no-interleave` runs them: long stretches of one shape), on a replay whose steps cost
    `drift` times what `truth` says; every step refines `cost`. Returns the steps served."""
    from adactl.stacks import StackContext, build_stack

    steps = 0
    for r, stack in enumerate(["no-spec", "fixed-k1", "goodput", "fixed-k2", "fixed-k4", "goodput"]):
        truth_here = _Scaled(truth, drift)
        engine = ReplayEngine(truth_here, alpha=alpha, max_batch_size=batch, noise=0.05, seed=seed + r)
        for _ in range(batch):
            engine.add_request(200, SamplingParams(max_new_tokens=32, stop_on_eos=False))
        built = build_stack(stack, StackContext(cost, lambda name: MovingAverage(prior=alpha[0])))
        loop = ControlLoop(engine, built.schedule, max_draft_len=8, estimators=[cost], clock=engine.clock,
                           prefill_budget=200 * batch)  # fmt: skip
        loop.run()
        steps += loop.steps
    return steps


class _Scaled:
    """A step-time predictor `factor` times another (a machine that slowed down)."""

    def __init__(self, base: object, factor: float) -> None:
        self.base, self.factor = base, factor

    def predict_parts(self, shapes: list[StepShape]) -> np.ndarray:
        return self.base.predict_parts(shapes) * self.factor  # type: ignore[attr-defined]

    def predict(self, shapes: list[StepShape]) -> np.ndarray:
        return self.base.predict(shapes) * self.factor  # type: ignore[attr-defined]


class MeasuredMachine:
    """This machine as its profile's steps measured it, independent of any model of ours: the
    profile's linear basis times, at (rows, tokens verified per row), the median of what the
    whole-batch steps there measured over the basis (interpolated in log2 rows and in the
    draft length between measured cells)."""

    def __init__(self, profile: StepCostProfile) -> None:
        shapes, seconds = profile.shapes()
        self.theta = profile.theta
        cells: dict[tuple[int, int], list[float]] = {}
        base = np.maximum(np.maximum(features(shapes) @ self.theta, 0.0).sum(1), 1e-5)
        for s, y, b in zip(shapes, seconds.sum(1), base):
            whole = s.prefill_tokens == 0 and s.draft_tokens == s.rows * s.max_draft == s.rows * (s.max_verify - 1)
            if whole:
                cells.setdefault((s.rows, s.max_draft), []).append(math.log(y / b))
        self.rows = sorted({r for r, _ in cells})
        self.table = []  # per measured batch size: (lengths, median log factors)
        for r in self.rows:
            ks = sorted(k for rr, k in cells if rr == r)
            self.table.append((ks, [float(np.median(cells[(r, k)])) for k in ks]))

    def _log_factor(self, rows: int, j: float) -> float:
        x = math.log2(max(rows, 1))
        at = [float(np.interp(j, ks, f)) for ks, f in self.table]
        return float(np.interp(x, [math.log2(r) for r in self.rows], at))

    def predict_parts(self, shapes: list[StepShape]) -> np.ndarray:
        parts = np.maximum(features(shapes) @ self.theta, 0.0)
        j = [s.verify_computed / max(s.rows, 1) - 1 for s in shapes]
        return parts * np.exp([self._log_factor(s.rows, jj) for s, jj in zip(shapes, j)])[:, None]

    def predict(self, shapes: list[StepShape]) -> np.ndarray:
        return np.maximum(self.predict_parts(shapes).sum(1), 1e-5)


def test_refinement_keeps_the_profiles_shape_through_a_servers_phases() -> None:
    """Issue 30's `make bench` failure, in seconds: one cost model shared by every run, as a
    server's is, through phases of one batch size and temperature each (runs of fixed k and
    goodput interleaved), on a replay of this machine as its profile measured it (a
    co-located job makes every step 25% slower for two phases). After every phase the ratio
    of a k-token step to a plain one stays within 10% of the machine's at batch 1, 4, 16 and
    64, and goodput chooses the machine's best k wherever that k wins by more than 5%.
    (On commit 40b5b72 the first check fails: the basis alone misprices the ratios.)"""
    profile = shipped_cpu_profile()
    truth, cost = MeasuredMachine(profile), profile.model()
    greedy = [0.47, 0.48, 0.51, 0.48, 0.6, 0.51, 0.5, 0.5]  # the shipped acceptance by position
    sampled = [a * 0.75 for a in greedy]
    phases = [(64, greedy, 1.0), (1, greedy, 1.0), (16, sampled, 1.25), (4, sampled, 1.25), (64, sampled, 1.0),
              (16, greedy, 1.0), (1, sampled, 1.0), (4, greedy, 1.0)]  # fmt: skip
    for i, (batch, alpha, drift) in enumerate(phases):
        serve_phase(cost, truth, batch, alpha, seed=100 * i, drift=drift)
        errors = ratio_errors(cost, truth, (1, 4, 16, 64), (1, 2, 4))
        worst = max(errors, key=errors.__getitem__)
        assert errors[worst] <= 0.10, f"phase {i} (batch {batch}): T(k)/T(0) off by {errors[worst]:.1%} at {worst}"
        for a in (greedy, sampled):
            wrong = wrong_choices(cost, truth, torch.tensor(a), (1, 4, 16, 64))
            assert not wrong, f"phase {i} (batch {batch}): goodput's k against the machine's: {wrong}"


def test_steps_where_part_of_the_batch_drafts_teach_levels_not_ratios() -> None:
    """Probes on part of the batch, SV's cuts and prefill steps, however cheap they run,
    cannot move the model toward drafting at a batch size where no whole-batch draft was
    ever served: the ratios stay the profile's; the level follows them."""
    profile = shipped_cpu_profile()
    cost, prior = profile.model(), profile.model(refine=False)
    rng = np.random.default_rng(3)
    for _ in range(300):
        few = int(rng.integers(1, 17))  # a quarter of 64 rows or fewer draft 1..4, the rest nothing
        k = int(rng.integers(1, 5))
        cut = [int(rng.integers(0, k + 1)) for _ in range(few)] + [0] * (64 - few)
        shape = StepShape.of_lengths(sorted(cut, reverse=True), [k] * few + [0] * (64 - few), 0, 64 * 250)
        cost.observe(shape, prior.predict_parts([shape])[0] * 0.5)  # half what the profile says
    assert max(ratio_errors(cost, prior, (32, 64), (1, 2, 4)).values()) < 1e-6
    plain = whole_batch(64, 0, 64 * 250)
    assert float(cost.predict([plain])[0]) < 0.6 * float(prior.predict([plain])[0])  # the level learned


def test_the_surface_prices_many_shapes_as_its_basis_does() -> None:
    """`at_shapes` (what every prediction calls: a Python path for a few shapes, numpy for
    many) gives `basis(shape) @ w` exactly, at the edges too: prefill-only steps, more rows
    than the last bucket, more verified tokens than the last cell, fractional buckets and
    cells; and pricing 400 shapes costs far less than 400 single predictions."""
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.3, SIZE)
    shapes = served_shapes(rng, 60) + [
        StepShape(0, 0, 0, 0, 0, 128, 0),  # prefill only
        StepShape(300, 300 * 3, 3, 300 * 2, 2, 0, 300 * 50),  # past the last bucket
        StepShape(3, 3 * 12, 12, 3 * 11, 11, 0, 600),  # past the last cell
        whole_batch(48, 1, 48 * 200),  # between two buckets
        StepShape.of_lengths([12] * 5, [9] * 5, 0, 800, forwards=3),  # a width-4 tree of depth 3
    ]
    exact = np.array([basis(s) @ w for s in shapes])
    for n in (1, VECTOR_FROM - 1, VECTOR_FROM, len(shapes)):
        assert np.allclose(at_shapes(w, shapes[-n:]), exact[-n:], rtol=0, atol=1e-12), n
    many = served_shapes(rng, 400)
    start = time.perf_counter()
    at_shapes(w, many)
    together = time.perf_counter() - start
    start = time.perf_counter()
    for s in many:
        at_shapes(w, [s])
    assert together < (time.perf_counter() - start) / 2  # measured 0.2 against 3 ms


def test_a_tree_step_reads_the_surface_at_its_depth() -> None:
    """A token tree of depth d (d draft forwards, W d nodes verified a row) takes the surface's
    correction of a chain of d tokens at its batch size, not of a chain as long as its node
    count: chains teach the slopes and cells one draft forward and one verified token per j,
    and a width-4 tree at j = 8-11 read them extrapolated (the H100 replay's online surface
    then priced trees 5-12% above the profile, and the tree controllers drafted chains where a
    fixed tree was 1.14-1.19x faster)."""
    tree = StepShape.of_lengths([8] * 4, [5] * 4, 0, 1000, forwards=2)  # depth 2, width 4, 8 nodes a row
    assert np.array_equal(basis(tree), basis(whole_batch(4, 2, 1000)))
    assert not np.array_equal(basis(tree), basis(whole_batch(4, 7, 1000)))  # (as it was read before)


def test_one_slow_step_moves_the_prediction_a_little() -> None:
    """A step twice as slow as its neighbours (a CPU step now and then is) moves the next
    prediction by a fraction of it, not to it (the levels' drift was their prior's width
    spread over their memory: a gain of 0.9, and every prediction of that batch size
    followed the last step)."""
    cost = shipped_cpu_profile().model()
    shape = whole_batch(8, 2, 2000)
    steady = float(cost.frozen().predict([shape])[0])
    for _ in range(30):
        cost.observe(shape, (0.0, 0.0, steady))
    before = float(cost.predict([shape])[0])
    cost.observe(shape, (0.0, 0.0, 2 * before))
    assert before < float(cost.predict([shape])[0]) < 1.3 * before  # 1.87x before


def test_absurd_step_times_are_counted_not_learned() -> None:
    """A paused process, a clock jump or a broken timer: not finite, not positive, or 100x
    off the prediction. None moves the model; each is counted."""
    cost = shipped_cpu_profile().model()
    shape = whole_batch(8, 2, 2000)
    before = float(cost.predict([shape])[0])
    bad = [(0.0, 0.0, 0.0), (0.0, -0.1, 0.05), (0.0, float("nan"), 0.1), (0.0, 0.0, float("inf")),
           (0.0, 0.0, 200 * before), (0.0, 0.0, before / 200)]  # fmt: skip
    for seconds in bad:
        cost.observe(shape, seconds)
    assert cost.rejected == len(bad) and cost.updates == 0
    assert float(cost.predict([shape])[0]) == before
    cost.observe(shape, (0.0, 0.0, 2 * before))  # slow, but a real step: learned
    assert cost.updates == 1 and float(cost.predict([shape])[0]) > before


def test_goodput_probes_what_the_model_could_be_wrong_about() -> None:
    """A probe is a step spent off c*: worth it where the neighbour is within the model's
    uncertainty of the cost ratio, not where its goodput is predicted far lower (make bench run
    5: at batch 32, where k = 1 ran at 0.79 of plain decoding, goodput drafted on a few of a
    run's 32 steps and ran at 0.94-0.95 of plain decoding).
    With every neighbour unmeasured (novelty 1) the old rule probed at the `explore` rate
    everywhere: 50% of these steps."""
    from adactl.controllers.goodput import goodput_rates, shortest_within
    from adactl.interface import ScheduleState
    from adactl.runtime import RequestView

    def probe_rate(rows: int, alpha: float, foreign: bool = False) -> tuple[float, float]:
        cost, ma = shipped_cpu_profile().model(foreign=foreign), MovingAverage(prior=alpha)
        controller = GoodputLength(cost, ma, explore=0.5, seed=0)
        views = tuple(RequestView(f"r{i}", "running", 40, 40, 10, 50, 0.0, 0.1, SamplingParams()) for i in range(rows))
        state = ScheduleState(0.0, views, max_draft_len=8)
        estimate = ma.estimate(state)
        rates = goodput_rates(cost, estimate.alpha.mean(0), rows, 50 * rows)
        best = shortest_within(rates, controller.margin)
        nearest = max(rates[c] for c in (best - 1, best + 1) if 0 <= c <= 8) / rates[best]
        picks = [controller.act(state, estimate).draft_len for _ in range(1000)]
        return sum(p != best for p in picks) / len(picks), nearest

    far, far_ratio = probe_rate(64, 0.02)
    near, near_ratio = probe_rate(8, 0.6)
    assert far_ratio < 0.7 and near_ratio > 0.95  # the shapes are what the test means
    assert far < 0.1  # measured 0.038 (k = 1 predicted at 0.67 of plain decoding)
    assert near > 0.3  # measured 0.46 (the neighbour at 0.98)
    # another machine's profile may be off by far more than the gap: it still probes
    assert probe_rate(64, 0.02, foreign=True)[0] > 0.2  # measured 0.27


def test_the_cost_ratio_is_surer_where_both_lengths_were_served() -> None:
    """`ratio_sd`, which the goodput controller's probes ask: the online surface's prior where
    nothing was served, smaller once whole-batch steps of both lengths were, unchanged at
    another batch size; never under log 2 for another machine's profile."""
    cost = shipped_cpu_profile().model()
    plain, k1 = whole_batch(32, 0, 8000), whole_batch(32, 1, 8000)
    far_plain, far_k1 = whole_batch(2, 0, 500), whole_batch(2, 1, 500)
    before, far_before = cost.ratio_sd(k1, plain), cost.ratio_sd(far_k1, far_plain)
    assert 0.15 < before < 0.3
    predicted = cost.frozen().predict([plain, k1])
    for _ in range(20):
        cost.observe(plain, (0.0, 0.0, float(predicted[0])))
        cost.observe(k1, (0.0, 0.0, float(predicted[1])))
    assert cost.ratio_sd(k1, plain) < 0.5 * before
    assert cost.ratio_sd(far_k1, far_plain) > 0.9 * far_before
    assert cost.frozen().ratio_sd(k1, plain) == 0.0  # it learns nothing, so nothing is worth probing
    assert shipped_cpu_profile().model(foreign=True).ratio_sd(k1, plain) == pytest.approx(math.log(2.0))


def test_profile_leaves_out_steps_that_capture_graphs() -> None:
    """A step that captured a CUDA graph is timed at the capture's cost (80-700 ms against
    9-40 ms steps on an H200 at the 8B shape): the profile leaves it out. On the CPU the
    graphs' stand-in captures too, so the same measurement with graphs on keeps exactly the
    steps that captured nothing, and with graphs off keeps them all."""
    from adactl.profiler import measure, tiny_pair
    from adactl.runtime import Engine, EngineConfig

    pair = tiny_pair()
    kept, left_out = {}, {}
    for graphs in (False, True):
        engine = Engine(pair.target.model, pair.draft, config=EngineConfig(max_batch_size=4, seed=0, graphs=graphs))
        stats: dict[str, int] = {}
        shapes, seconds = measure(engine, pair.device, 256, max_batch=4, budget_s=120, reps=2, seed=3, progress=False,
                                  stats=stats)  # fmt: skip
        assert len(shapes) == len(seconds)
        kept[graphs], left_out[graphs] = len(shapes), stats["captures"]
        assert left_out[graphs] <= engine.graph_stats()["captures"]
    assert left_out[False] == 0 and left_out[True] > 0
    assert kept[True] + left_out[True] == kept[False]  # the same steps, less those that captured


def test_profile_of_a_named_shape_with_random_weights(tmp_path, monkeypatch, capsys) -> None:
    """`adactl profile --shape NAME`: a GPU's costs at a real model's shape without its weights
    (the 8B shape on a lent GPU); the profile names the shape, and an unknown one is refused."""
    from adactl.cli import main

    monkeypatch.setenv("ADACTL_CACHE", str(tmp_path))
    assert main(["profile", "--shape", "tiny", "--device", "cpu", "--max-batch", "2", "--budget-s", "10",
                 "--out", str(tmp_path / "tiny.json")]) == 0  # fmt: skip
    made = StepCostProfile.load(tmp_path / "tiny.json")
    assert made.fingerprint.target == "shape:tiny" and made.fingerprint.draft == "random-feature"
    assert len(made.steps) > 10
    with pytest.raises(SystemExit, match="unknown --shape 'llama-9b'"):
        main(["profile", "--shape", "llama-9b", "--device", "cpu"])
