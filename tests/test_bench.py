"""The benchmarks end to end on tiny models: tables, JSON records and PNG plots."""

from __future__ import annotations

import gc
import json
import random
import re

import pytest
import torch

from adactl.bench.common import one_thread
from adactl.cli import main

REQUIRED = {"config", "batch_size", "tokens_per_s", "mean_accepted_len", "step_ms", "peak_mem_mb", "kv_bytes_per_token"}


def test_bench_step_writes_records_targets_and_plot(tmp_path, capsys):
    args = ["--shapes", "tiny", "--batches", "1,2", "--ks", "0,4", "--prompt-len", "16", "--steps", "2"]
    main(["bench", "step", *args, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "step.json").read_text())
    assert {(r["batch"], r["k"]) for r in data["records"]} == {(1, 0), (1, 4), (2, 0), (2, 4)}
    for r in data["records"]:
        assert 0 < r["bare_eager_ms"] and 0 < r["verify_ms"] <= r["engine_ms_median"] * 1.5
        assert r["bare_graph_ms"] is None  # no CUDA graphs on a CPU
        assert r["engine_over_bare"] == r["engine_ms"] / r["bare_eager_ms"]
        assert r["bare_eager_ms"] <= r["bare_median_ms"] and r["engine_ms"] <= r["engine_ms_median"]
        assert r["median_over_bare"] == r["engine_ms_median"] / r["bare_median_ms"]
    assert {t["target"] for t in data["meta"]["targets"]} == {
        "plain step / bare forward, batch 1 (medians)",
        "verify 5 tokens / 1 token, batch 1 (medians)",
    }
    assert (tmp_path / "step.png").stat().st_size > 10_000
    assert "engine_over_bare" in capsys.readouterr().out


def test_bench_step_bare_forward_is_the_models_own_forward():
    """The floor the engine is compared with computes the right thing: the static-cache
    forward after a context equals one forward over context and tokens, every call."""
    import torch

    from adactl.bench.step import random_model, static_forward

    model = random_model("tiny", torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    context, ids = torch.randint(512, (3, 20), generator=gen), torch.randint(512, (3, 5), generator=gen)
    with torch.inference_mode():
        full = model(torch.cat([context, ids], 1)).logits[:, 20:]
        forward = static_forward(model, context, ids)
        for _ in range(3):
            torch.testing.assert_close(forward().logits, full, atol=1e-4, rtol=1e-4)


def test_bench_step_rejects_unknown_shapes(capsys):
    import pytest

    with pytest.raises(SystemExit, match="unknown shape"):
        main(["bench", "step", "--shapes", "gpt-5"])


def test_bench_runtime_writes_json_and_plot(tmp_path, capsys):
    args = ["--tiny", "--batch-sizes", "1,4", "--max-new-tokens", "8", "--rounds", "2", "--out", str(tmp_path)]
    main(["bench", "runtime", *args])
    data = json.loads((tmp_path / "runtime.json").read_text())
    configs = {(r["config"], r["batch_size"]) for r in data["records"]}
    assert configs == {
        ("hf_generate", 1),
        ("engine_plain", 1),
        ("engine_k4", 1),
        ("hf_assisted", 1),
        ("hf_assisted_k4", 1),
        ("hf_generate", 4),
        ("engine_plain", 4),
        ("engine_k4", 4),
    }
    for record in data["records"]:
        assert REQUIRED <= set(record) and record["tokens_per_s"] > 0
    compares = {(r["batch_size"], r["metric"], r["compare"]) for r in data["meta"]["ratios"]}
    assert (4, "tokens_per_s", "engine_plain / hf_generate") in compares
    assert (1, "tokens_per_s", "engine_k4 / hf_assisted_k4") in compares
    assert all(r["min"] <= r["ratio"] <= r["max"] for r in data["meta"]["ratios"])
    assert len(data["meta"]["rounds"]) == 2 * len(configs)
    assert (tmp_path / "runtime.png").stat().st_size > 10_000
    assert "engine_plain / hf_generate" in capsys.readouterr().out


def test_bench_draft_writes_summary_and_plot(tmp_path, capsys):
    args = ["--tiny", "--prompts", "2", "--max-new-tokens", "10", "--ks", "1,4", "--out", str(tmp_path)]
    main(["bench", "draft", *args])
    data = json.loads((tmp_path / "draft.json").read_text())
    (summary,) = data["records"]
    for key in ("dataset", "greedy_acceptance", "mean_accepted_len_k4", "draft_cost_ratio", "speedup_bs1"):
        assert summary[key] is not None, key
    assert 0 <= summary["greedy_acceptance"] <= 1 and summary["mean_accepted_len_k4"] >= 1
    assert summary["draft_cost_ratio"] > 0 and summary["speedup_bs1"] > 0
    assert {r["config"] for r in data["meta"]["rows"]} == {"plain", "k=1", "k=4"}
    assert (tmp_path / "draft.png").stat().st_size > 10_000
    assert "speedup_bs1" in capsys.readouterr().out


def test_bench_spec_compares_every_controller(tmp_path, capsys):
    args = [
        "--tiny",
        "--batches",
        "1,3",
        "--temperatures",
        "0,0.7",
        "--ks",
        "2",
        "--max-new-tokens",
        "6",
        "--rounds",
        "2",
    ]
    main(["bench", "spec", *args, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "spec.json").read_text())
    names = {"no-spec", "fixed-k2", "heuristic,confidence-stop", "bucket-ema", "goodput", "goodput-req", "fixed-k6,sv",
             "goodput,sv", "oracle"}  # fmt: skip
    runs = {(r["controller"], r["batch_size"], r["temperature"]) for r in data["records"]}
    assert runs == {(n, b, t) for n in names for b in (1, 3) for t in (0.0, 0.7)}
    for r in data["records"]:
        assert r["tokens_per_s"] > 0 and r["tokens"] == r["batch_size"] * 6 or r["tokens"] <= r["batch_size"] * 6
        assert not r["fallbacks"] and len(r["rounds"]) == 2 and r["tokens_per_s"] in r["rounds"]
        assert {"ratio_best_fixed", "ratio_oracle", "mean_accepted_len", "step_ms"} <= set(r)
    best = [r for r in data["records"] if r["controller"] in ("no-spec", "fixed-k2") and r["ratio_best_fixed"] == 1.0]
    assert len(best) == 4  # one best constant per batch size and temperature
    for b in (1, 3):  # paired ratios: within each round, the round's best fixed configuration is 1
        for t in (0.0, 0.7):
            fixed = [r for r in data["records"] if r["batch_size"] == b and r["temperature"] == t
                     and r["controller"] in ("no-spec", "fixed-k2")]  # fmt: skip
            for i in range(2):
                assert max(r["round_ratios"][i] for r in fixed) == 1.0
                assert all(r["round_ratios"][i] <= 1.0 for r in fixed)
            assert all(r["ratio_paired"] == sum(r["round_ratios"]) / 2 for r in fixed)
    assert (tmp_path / "spec.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "goodput,sv" in out and "temperature 0.7: best adaptive / best fixed k at batch 1 / 3: fastest round" in out
    assert gc.get_freeze_count() > 0  # the loaded models out of the collector's walks before any step was timed
    machine = data["meta"]["machine"]  # where it ran, in the JSON and the plot's title
    assert machine["device_type"] in ("cpu", "cuda") and machine["dtype"] == "float32" and "float32" in machine["label"]


def test_freeze_heap_leaves_what_is_loaded_out_of_every_collection(target):
    from adactl.runtime import freeze_heap

    assert gc.get_freeze_count() == 0
    frozen = freeze_heap()
    assert frozen == gc.get_freeze_count() > 1000
    walked = {id(o) for o in gc.get_objects()}  # every generation the collector walks
    assert id(target) not in walked and not any(id(p) in walked for p in target.parameters())
    fresh = [[]]
    assert id(fresh) in {id(o) for o in gc.get_objects()}  # what comes later is collected as before
    gc.unfreeze()
    assert id(target) in {id(o) for o in gc.get_objects()}


def test_bench_spec_samples_each_round_anew_with_draws_shared_by_its_runs(tmp_path, monkeypatch):
    """Round r seeds request i with seed + ROUND_SEEDS * r + i in every run of that round (the
    oracle's included): a sampled configuration meets new luck each round, never another's."""
    from adactl.bench.spec import ROUND_SEEDS
    from adactl.runtime.engine import Engine

    seeds: dict[str, list[int]] = {}
    add = Engine.add_request

    def seen(self, prompt, sampling=None, request_id=None, **kwargs):
        run, i = request_id.split("/req-")
        seeds.setdefault(run, []).append(sampling.seed - int(i))
        return add(self, prompt, sampling, request_id, **kwargs)

    monkeypatch.setattr(Engine, "add_request", seen)
    main(["bench", "spec", "--tiny", "--batches", "2", "--temperatures", "0.7", "--controllers", "no-spec;fixed-k2",
          "--max-new-tokens", "3", "--rounds", "3", "--seed", "5", "--out", str(tmp_path)])  # fmt: skip
    rounds = [5 + ROUND_SEEDS * r for r in range(3) for _ in range(2)]  # two requests a round
    assert seeds == {"no-spec": rounds, "fixed-k2": rounds, "oracle": rounds}


def test_bench_spec_gives_each_runs_controllers_draws_of_their_own(tmp_path, monkeypatch):
    """The controllers' own draws (`goodput`'s and `goodput-req`'s probes) are seeded by round and
    batch size: with seed 0 in every run, `goodput` probed at the same step of every run (issue 30)."""
    from adactl.bench.spec import ROUND_SEEDS
    from adactl.controllers import goodput, request_goodput

    seeds: dict[str, list[int]] = {}
    for module, cls in ((goodput, "GoodputLength"), (request_goodput, "RequestGoodput")):
        original = getattr(module, cls).__init__

        def init(self, *args, _original=original, _cls=cls, seed=0, **kwargs):
            seeds.setdefault(_cls, []).append(seed)
            _original(self, *args, seed=seed, **kwargs)

        monkeypatch.setattr(getattr(module, cls), "__init__", init)
    main(["bench", "spec", "--tiny", "--batches", "1,2", "--temperatures", "0", "--controllers",
          "no-spec;goodput;goodput-req", "--max-new-tokens", "3", "--rounds", "2", "--seed", "5", "--out",
          str(tmp_path)])  # fmt: skip
    expected = [5 + ROUND_SEEDS * r + batch for batch in (1, 2) for r in range(2)]
    assert seeds == {"GoodputLength": expected, "RequestGoodput": expected}


def test_bench_spec_interleaves_a_rounds_runs_each_on_its_own_clock(tmp_path, monkeypatch):
    """A round's runs take their steps in turn, shuffled each turn, each run timed only inside
    its own steps; the rate counts after the first step (the prefill). Interleaving changes
    no run's tokens: with `--no-interleave` the fixed configurations emit exactly the same."""
    from adactl.bench import spec

    steps: list[str] = []
    clocks: list[tuple[str, float]] = []
    ids: set[str] = set()
    shuffles: list[int] = []
    step = spec.Serving.step

    def logged(self):
        steps.append(self.label["controller"])
        ids.update(r.request_id for r in self.engine.requests())
        before = self.loop.clock()
        step(self)
        clocks.append((self.label["controller"], self.loop.clock() - before))

    class Counted(random.Random):
        def shuffle(self, x):
            shuffles.append(len(x))
            super().shuffle(x)

    monkeypatch.setattr(spec.Serving, "step", logged)
    monkeypatch.setattr(spec.random, "Random", Counted)
    argv = ["bench", "spec", "--tiny", "--batches", "2", "--temperatures", "0", "--max-new-tokens", "6",
            "--rounds", "1", "--controllers", "no-spec;fixed-k1;fixed-k2", "--out"]  # fmt: skip
    main([*argv, str(tmp_path / "on")])
    turns = [steps[i : i + 3] for i in range(0, 9, 3)]  # each run takes a step before any takes a second
    assert all(sorted(t) == ["fixed-k1", "fixed-k2", "no-spec"] for t in turns[:2])
    assert shuffles[:2] == [3, 3]  # the order is drawn anew every turn
    # each run's requests under ids of its own (estimators a round shares keep state by id)
    assert {i.split("/")[0] for i in ids} == {"no-spec", "fixed-k1", "fixed-k2", "oracle"} and len(ids) == 8
    records = {r["controller"]: r for r in json.loads((tmp_path / "on" / "spec.json").read_text())["records"]}
    for name in ("no-spec", "fixed-k1", "fixed-k2"):
        own = sum(s for n, s in clocks if n == name)  # its clock moved only while it stepped
        r = records[name]
        assert r["wall_s"] == pytest.approx(own, rel=1e-6)
        assert 0 < r["first_step_s"] < r["wall_s"]
        assert r["tokens_per_s"] == pytest.approx((r["tokens"] - 2) / (r["wall_s"] - r["first_step_s"]))
    steps.clear()
    main([*argv[:-1], "--no-interleave", "--out", str(tmp_path / "off")])
    assert steps == sorted(steps, key=["no-spec", "fixed-k1", "fixed-k2", "oracle"].index)  # one run after another
    again = {r["controller"]: r for r in json.loads((tmp_path / "off" / "spec.json").read_text())["records"]}
    for name in ("no-spec", "fixed-k1", "fixed-k2"):
        assert (again[name]["tokens"], again[name]["steps"], again[name]["mean_accepted_len"]) == (
            records[name]["tokens"], records[name]["steps"], records[name]["mean_accepted_len"])


def test_bench_spec_keeps_a_stopped_runs_finished_cells_and_resumes_from_them(tmp_path, monkeypatch, capsys):
    """A run stopped in its second cell leaves the first cell's records on disk (spec.partial.json,
    written after every cell); `--resume` with the same settings runs only the cells left and
    writes spec.json with both, the kept cell's records as they were; other settings, or nothing
    to resume, are refused with a clear error; a run started anew says it replaces them."""
    from adactl.bench import spec

    argv = ["bench", "spec", "--tiny", "--batches", "1,2", "--temperatures", "0", "--controllers",
            "no-spec;fixed-k2", "--max-new-tokens", "3", "--rounds", "1", "--out", str(tmp_path)]  # fmt: skip
    start = spec.start_one
    started: list[int] = []
    stop = True

    def stopping(*args, **kwargs):
        batch = args[7] if len(args) > 7 else kwargs["batch"]
        started.append(batch)
        if stop and batch == 2:
            raise KeyboardInterrupt  # as a person's Ctrl-C, in the second cell's first run
        return start(*args, **kwargs)

    monkeypatch.setattr(spec, "start_one", stopping)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    kept = json.loads((tmp_path / "spec.partial.json").read_text())
    assert kept["meta"]["complete"] is False and not (tmp_path / "spec.json").exists()
    assert {(r["controller"], r["batch_size"]) for r in kept["records"]} == {
        ("no-spec", 1), ("fixed-k2", 1), ("oracle", 1)}  # fmt: skip
    assert all(r["ratio_best_fixed"] > 0 for r in kept["records"])
    with pytest.raises(SystemExit, match="other settings.*max_new_tokens"):
        main([*argv[:-4], "--max-new-tokens", "4", "--rounds", "1", "--out", str(tmp_path), "--resume"])
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):  # a run started anew says it will replace the stopped run's cells
        main(argv)
    assert "starting anew" in capsys.readouterr().err
    assert json.loads((tmp_path / "spec.partial.json").read_text())["records"] != kept["records"]  # replaced
    kept = json.loads((tmp_path / "spec.partial.json").read_text())
    stop, started[:] = False, []
    main([*argv, "--resume"])
    assert set(started) == {2}  # the kept cell did not run again
    done = json.loads((tmp_path / "spec.json").read_text())
    assert not (tmp_path / "spec.partial.json").exists()
    assert done["meta"]["resumed_cells"] == ["(0.0, 1)"]
    records = {(r["controller"], r["batch_size"]): r for r in done["records"]}
    assert set(records) == {(c, b) for c in ("no-spec", "fixed-k2", "oracle") for b in (1, 2)}
    for r in kept["records"]:
        assert records[r["controller"], 1] == r
    with pytest.raises(SystemExit, match="no stopped run"):
        main([*argv, "--resume"])


def test_bench_spec_serves_small_batches_in_waves_each_counted_after_its_prefill(tmp_path, monkeypatch):
    """`--min-requests 5` at batch 2: every run serves 6 requests, 2 at a time, the next 2 joining
    only once the last of the wave before has finished, each with its own prompt and seed; the
    rate counts each wave after its first step (the wave's prefill), and the waves' prefill
    seconds are all that is left out of the run's own clock. Batch 8 is one wave, as before."""
    from adactl.bench import spec
    from adactl.runtime.engine import Engine

    joined: list[tuple[str, int, int]] = []  # (run, request, requests unfinished when it joined)
    add = Engine.add_request

    def seen(self, prompt, sampling=None, request_id=None, **kwargs):
        run, i = request_id.split("/req-")
        joined.append((run, int(i), sampling.seed, len(self.requests())))
        return add(self, prompt, sampling, request_id, **kwargs)

    prefill_s: dict[tuple[str, int], float] = {}
    step = spec.Serving.step

    def timed(self):
        first = self.steps == self.start[2]  # the wave's first step
        before = self.loop.clock()
        step(self)
        if first:
            key = (self.label["controller"], self.batch)
            prefill_s[key] = prefill_s.get(key, 0.0) + self.loop.clock() - before

    monkeypatch.setattr(Engine, "add_request", seen)
    monkeypatch.setattr(spec.Serving, "step", timed)
    main(["bench", "spec", "--tiny", "--batches", "2,8", "--temperatures", "0", "--controllers", "no-spec;fixed-k2",
          "--max-new-tokens", "4", "--rounds", "1", "--min-requests", "5", "--seed", "3",
          "--out", str(tmp_path)])  # fmt: skip
    saved = json.loads((tmp_path / "spec.json").read_text())["records"]
    records = {(r["controller"], r["batch_size"]): r for r in saved}
    for name in ("no-spec", "fixed-k2", "oracle"):
        mine = [(i, seed, busy) for run, i, seed, busy in joined if run == name]
        assert [i for i, _, _ in mine[:6]] == list(range(6))
        assert [s for _, s, _ in mine[:6]] == [3 + i for i in range(6)]
        assert [busy for _, _, busy in mine[:6]] == [0, 1, 0, 1, 0, 1]  # a wave joins an idle engine
        r = records[name, 2]
        assert (r["requests"], r["waves"], r["tokens"]) == (6, 3, 24)
        assert records[name, 8]["waves"] == 1 and records[name, 8]["requests"] == 8
    plain = records["no-spec", 2]  # 4 steps a wave (the prefill's token, then one each), 3 counted
    assert plain["steps"] == 12
    assert plain["tokens_per_s"] * plain["step_ms"] / 1000 == pytest.approx(18 / 9)
    counted_s = 18 / plain["tokens_per_s"]  # the run's own clock less its three prefill steps
    assert plain["wall_s"] - counted_s == pytest.approx(prefill_s["no-spec", 2], rel=1e-6)
    assert 0 < plain["first_step_s"] < prefill_s["no-spec", 2]  # the first wave's
    assert plain["actions"] == [["prefill", 1], ["2x0", 3]] * 3  # each wave's prefill, then its plain steps
    assert {a: n for a, (n, _) in plain["action_ms"].items()} == {"2x0": 9, "prefill": 3}
    spent = sum(n * ms for n, ms in plain["action_ms"].values()) / 1000  # every step, on the run's clock
    assert spent == pytest.approx(plain["wall_s"], rel=1e-6)
    assert plain["action_ms"]["prefill"][0] * plain["action_ms"]["prefill"][1] / 1000 == pytest.approx(
        prefill_s["no-spec", 2], rel=1e-6)
    drafting = records["fixed-k2", 8]
    assert sum(n for _, n in drafting["actions"]) == drafting["steps"]
    assert drafting["actions"][0] == ["prefill", 1] and drafting["actions"][1][0] == "8x2"  # then k = 2 a row
    # waves of one step each (the prefill's token is all there is): the whole run is counted
    main(["bench", "spec", "--tiny", "--batches", "2", "--temperatures", "0", "--controllers", "no-spec",
          "--max-new-tokens", "1", "--rounds", "1", "--min-requests", "4", "--out", str(tmp_path / "one")])  # fmt: skip
    one = json.loads((tmp_path / "one" / "spec.json").read_text())["records"][0]
    assert (one["waves"], one["steps"], one["tokens"]) == (2, 2, 4)
    assert one["tokens_per_s"] == pytest.approx(4 / one["wall_s"])


def test_bench_spec_replay_interleaved_serves_each_run_as_alone(tmp_path):
    """On the replay (simulated time, draws keyed by request), a fixed configuration's run is
    the same step for step whether the round's runs interleave or not: the same tokens, steps
    and simulated seconds, though each run's requests have ids of their own."""
    argv = ["bench", "spec", "--replay", "--tiny", "--profile", "h100-llama-3.1-8b", "--replay-traces", "none",
            "--batches", "4", "--temperatures", "0.7", "--ks", "1,3", "--max-new-tokens", "24",
            "--controllers", "no-spec;fixed-k1;fixed-k3;goodput", "--out"]  # fmt: skip
    got = []
    for extra in ([], ["--no-interleave"]):
        main([*argv[:-1], *extra, "--out", str(tmp_path / str(len(extra)))])
        records = json.loads((tmp_path / str(len(extra)) / "spec_replay.json").read_text())["records"]
        got.append({r["controller"]: r for r in records})
    for name in ("no-spec", "fixed-k1", "fixed-k3"):
        keys = ("tokens", "steps", "mean_accepted_len", "wall_s", "tokens_per_s")
        assert [got[0][name][k] for k in keys] == [got[1][name][k] for k in keys], name
    assert got[0]["fixed-k3"]["mean_accepted_len"] > 1.5  # sampled draws that accept
    # a request served under another id keeps its draws where the bench names them (`draws`)
    from adactl.estimators.step_time import tiny_step_time
    from adactl.runtime import SamplingParams, StepPlan
    from adactl.runtime.replay import ReplayEngine

    def accepted(**ids) -> list[int]:
        engine = ReplayEngine(tiny_step_time(), alpha=[0.6, 0.5, 0.4], seed=3)
        engine.add_request(8, SamplingParams(40, temperature=0.7), **ids)
        out: list[int] = []
        while engine.has_unfinished():
            engine.draft_step(StepPlan(draft_len=3, prefill_budget=64))
            out += engine.verify().accepted.tolist()
        return out

    assert accepted(request_id="fixed-k3/req-0", draws="req-0") == accepted()  # the default id is req-0
    assert accepted(request_id="fixed-k3/req-0") != accepted()


def test_bench_spec_quick_keeps_an_explicit_rounds(tmp_path):
    main(["bench", "spec", "--tiny", "--quick", "--rounds", "2", "--controllers", "no-spec;goodput",
          "--max-new-tokens", "4", "--out", str(tmp_path)])  # fmt: skip
    records = json.loads((tmp_path / "spec.json").read_text())["records"]
    assert {r["batch_size"] for r in records} == {1, 8, 32}
    assert all(len(r["rounds"]) == 2 for r in records)


def test_bench_spec_an_explicit_value_stands_whatever_the_mode():
    """The replay has defaults of its own (the GPU regime's: batch 1-256, k 1-6, 128 tokens),
    and a value given on the command line stands even where it equals the engine's default
    (it was replaced: `--replay --max-new-tokens 32` ran 128 tokens)."""
    from adactl.bench.spec import SpecSettings
    from adactl.settings import parse

    def resolved(*argv: str) -> SpecSettings:
        return parse(SpecSettings, list(argv)).resolved()

    engine, replay = resolved(), resolved("--replay")
    assert (engine.batches, engine.ks, engine.max_new_tokens) == ([1, 2, 4, 8, 16, 32, 64], [1, 2, 4], 32)
    assert (replay.batches[-1], replay.ks, replay.max_new_tokens) == (256, [1, 2, 3, 4, 5, 6], 128)
    given = resolved("--replay", "--batches", "1,2,4,8,16,32,64", "--ks", "1,2,4", "--max-new-tokens", "32")
    assert (given.batches, given.ks, given.max_new_tokens) == ([1, 2, 4, 8, 16, 32, 64], [1, 2, 4], 32)
    quick = resolved("--quick")
    assert (quick.batches, quick.ks, quick.max_new_tokens) == ([1, 8, 32], [2, 4], 24)
    assert resolved("--quick", "--max-new-tokens", "4").max_new_tokens == 4
    # small batches serve 8 requests in waves on the engine; the quick look, the smoke run and the replay one wave
    assert engine.min_requests == 8
    assert quick.min_requests == replay.min_requests == resolved("--tiny").min_requests == 1
    assert resolved("--replay", "--min-requests", "8").min_requests == 8
    with pytest.raises(SystemExit, match="at least 1"):
        resolved("--min-requests", "0")


def test_bench_spec_replay_shows_the_gpu_regime(tmp_path, capsys):
    """On the computed H100 profile (no model runs), speculation pays at batch 1 and plain
    decoding wins at batch 256, and goodput follows: it drafts at 1 and not at 256."""
    args = ["--replay", "--tiny", "--profile", "h100-llama-3.1-8b", "--replay-traces", "none", "--batches", "1,256",
            "--temperatures", "0", "--ks", "1,3", "--max-new-tokens", "48", "--out", str(tmp_path)]  # fmt: skip
    main(["bench", "spec", *args])
    data = json.loads((tmp_path / "spec_replay.json").read_text())
    got = {(r["batch_size"], r["controller"]): r for r in data["records"]}
    assert {c for _, c in got} == {"no-spec", "fixed-k1", "fixed-k3", "heuristic", "bucket-ema", "goodput"}
    assert got[1, "fixed-k3"]["tokens_per_s"] > 1.3 * got[1, "no-spec"]["tokens_per_s"]
    assert got[256, "no-spec"]["tokens_per_s"] > got[256, "fixed-k3"]["tokens_per_s"]
    assert got[1, "goodput"]["mean_accepted_len"] > 1.5 and got[256, "goodput"]["mean_accepted_len"] < 1.2
    assert got[1, "goodput"]["ratio_best_fixed"] > 0.9 and got[256, "goodput"]["ratio_best_fixed"] > 0.9
    assert 6.0 < got[256, "no-spec"]["step_ms"] < 40  # replayed H100 milliseconds, not this CPU's
    assert data["meta"]["profile"] == "h100-llama-3.1-8b" and (tmp_path / "spec_replay.png").is_file()
    assert "replay of NVIDIA H100" in data["meta"]["machine"]["label"]


def test_bench_spec_replay_on_traces_runs_sv_trees_and_the_oracles(tmp_path, target, draft):
    """With per-request traces (recorded here from a tiny pair, chains and trees), every stack
    replays: SV reads the recorded signals, the tree stacks draft from the tree traces, the
    oracles read the replay's verdict (each beats the fixed draft it verifies)."""
    import torch

    from adactl.runtime.models import LoadedModel, ModelPair
    from adactl.traces import record_traces

    pair = ModelPair(LoadedModel(target, None, "tiny"), draft, None, torch.device("cpu"), torch.float32,
                     {"target": "tiny", "draft": "tiny-perturbed", "companion": "none"})  # fmt: skip
    prompts = [[5 + i, 9, 17 + i, 3] * 3 for i in range(4)]
    files = []  # each chain file, then its trees
    for t in (0.0, 0.7):
        for w in (0, 2):
            traces = record_traces(pair, prompts, t, k=4, max_new_tokens=16, batch=4, progress=False, tree_width=w)
            files.append(str(traces.save(tmp_path / f"t{t}w{w}.npz")))
    args = ["--replay", "--profile", "h100-llama-3.1-8b", "--replay-traces", ";".join(files), "--batches", "1,4",
            "--ks", "1,2", "--sv-k", "4", "--max-new-tokens", "16", "--trees", "--out", str(tmp_path)]  # fmt: skip
    main(["bench", "spec", *args])
    data = json.loads((tmp_path / "spec_trees_replay.json").read_text())
    names = {r["controller"] for r in data["records"]}
    assert {"fixed-k4,sv", "goodput,sv", "heuristic,confidence-stop", "oracle", "tree-d2w2n4", "tree-d4w2n8",
            "goodput-tree,tree-alloc", "tree-oracle"} <= names  # fmt: skip
    runs = {(r["temperature"], r["batch_size"], r["controller"]): r for r in data["records"]}
    for (t, b, name), r in runs.items():
        assert 0 < r["tokens"] <= 16 * b and not r["fallbacks"]  # a recorded EOS ends a request early
        if name in ("oracle", "tree-oracle"):
            chain = f"fixed-k{r['oracle_k']}" if r.get("oracle_k") else "no-spec"
            fixed = runs[t, b, r["oracle_tree"] if name == "tree-oracle" else chain]
            assert r["tokens"] == fixed["tokens"] and r["tokens_per_s"] >= 0.99 * fixed["tokens_per_s"]
    assert runs[0.0, 4, "tree-d4w2n8"]["mean_draft_len"] > runs[0.0, 4, "tree-d2w2n4"]["mean_draft_len"] > 2
    assert "traces" in data["meta"]["replay"]["acceptance"]


def test_bench_spec_slo_replays_in_the_gpu_regime(tmp_path):
    """`--slo --replay`: the mixed-SLO workload on the computed H100 and the shipped traces, in
    its units: plain decoding (6.5 ms steps) never meets the 6 ms class, speculation does."""
    args = ["--replay", "--profile", "h100-llama-3.1-8b", "--slo", "--slo-requests", "24", "--max-new-tokens", "32",
            "--slo-controllers", "no-spec;fixed-k2", "--out", str(tmp_path)]  # fmt: skip
    main(["bench", "spec", *args])
    data = json.loads((tmp_path / "spec_slo_replay.json").read_text())
    got = {r["controller"]: r for r in data["records"]}
    assert set(got) == {"no-spec", "fixed-k2", "slo,adaserve"}
    assert data["meta"]["args"]["slo_tpot"] == [0.006, 0.009, 0.015] and got["no-spec"]["requests"] == 24
    assert got["no-spec"]["attainment_tight"] == 0 and got["fixed-k2"]["attainment_tight"] > 0.3
    assert got["no-spec"]["attainment_loose"] == 1 and not any(r["fallbacks"] for r in got.values())


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--replay-traces", "none", "--controllers", "fixed-k6,sv"], "cannot run fixed-k6,sv"),
        (["--replay-traces", "none", "--trees"], "needs tree traces"),
        (["--trees", "--tree-width", "3"], "needs tree traces of width 3"),  # widths 2 and 4 are shipped
        (["--trees", "--tree-width", "1"], "at least 2 alternatives a level"),
        (["--trees", "--tree-extra-nodes", "-1"], "--tree-extra-nodes: 0 or more"),
        (["--slo", "--replay-traces", "none"], "--slo needs per-request traces"),
        ([], "needs --profile"),
        (["--replay-alpha", "0.5,1.5"], "probabilities in [0, 1]"),
    ],
)
def test_bench_spec_replay_refuses_what_it_cannot_replay(argv, says, tmp_path):
    profile = [] if argv == [] else ["--profile", "h100-llama-3.1-8b"]
    with pytest.raises(SystemExit, match=re.escape(says)):
        main(["bench", "spec", "--replay", "--tiny", *profile, *argv, "--out", str(tmp_path)])


def test_bench_spec_replay_names_a_bad_trace_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"junk")
    assert main(["bench", "spec", "--replay", "--profile", "h100-llama-3.1-8b", "--replay-traces", str(bad),
                 "--out", str(tmp_path)]) == 2  # fmt: skip


def test_bench_spec_slo_reports_attainment(tmp_path, capsys):
    args = ["--tiny", "--slo", "--slo-requests", "6", "--rate", "100", "--max-new-tokens", "6"]
    main(["bench", "spec", *args, "--slo-controllers", "fixed-k2;goodput", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "spec_slo.json").read_text())
    assert [r["controller"] for r in data["records"]] == ["fixed-k2", "goodput", "slo,adaserve"]
    for r in data["records"]:
        assert r["requests"] == 6 and 0 <= r["attainment"] <= 1 and r["tokens_per_s"] > 0
        assert {"attainment_tight", "attainment_medium", "attainment_loose", "slo_goodput"} <= set(r)
        assert r["slo_goodput"] <= r["tokens_per_s"] + 1e-9 and not r["fallbacks"]
    assert "adaserve" in capsys.readouterr().out


def test_bench_stream_sweeps_load_on_engine_and_replay(tmp_path, capsys):
    args = ["--tiny", "--loads", "20,200", "--requests", "6", "--validate", "--fcfs-seqs", "2"]
    main(["bench", "stream", *args, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "stream.json").read_text())
    names = {"fcfs", "fcfs-seqs2", "edf", "andes", "fcfs,ttft-budget", "progressserve,ttft-budget"}
    runs = {(r["backend"], r["load"], r["controller"]) for r in data["records"]}
    backends = ("engine", "replay", "replay-own")  # replay-own: priced by each engine run's own steps
    assert runs == {(b, load, n) for b in backends for load in (20.0, 200.0) for n in names}
    for r in data["records"]:
        assert {"controller", "load", "miss_rate", "admitted_inflight", "ttft_p99_s", "capacity_at_slo"} <= set(r)
        assert r["requests"] == 6 and 0 <= r["miss_rate"] <= 1 and not r["fallbacks"]
        assert r["units"] > 0 and r["admitted_inflight"] > 0
    assert data["meta"]["validation"]["runs"] == 12
    assert data["meta"]["validation"]["step_time_rel_error"] >= 0  # the profile priced the engine's own steps
    assert data["meta"]["validation"]["replay-own"]["runs"] == 12
    assert all("step_error" in r for r in data["records"] if r["backend"] == "engine")
    logged = json.loads((tmp_path / "stream_validate_steps.json").read_text())["records"]  # the engine's own steps
    assert len(logged) == 12 and all(s["prefill_s"] + s["verify_s"] > 0 for run in logged for s in run["steps"])
    assert (tmp_path / "stream.png").stat().st_size > 10_000
    assert "progressserve" in capsys.readouterr().out


def test_bench_stream_replay_bounds_the_batch_by_kv_memory(tmp_path):
    """--kv-tokens: the replay's batch is bounded by a pool of blocks; prompts wait for them and
    growth preempts by recompute (or, with --kv-offload, by a copy to host memory), counted in
    each record; nothing is lost."""
    args = ["--tiny", "--replay", "--loads", "200", "--requests", "12", "--controllers", "fcfs", "--kv-tokens", "96"]
    threads = torch.get_num_threads()
    main(["bench", "stream", *args, "--out", str(tmp_path)])
    (r,) = json.loads((tmp_path / "stream.json").read_text())["records"]
    assert r["requests"] == 12 and r["kv_blocks"] == 6 and r["kv_used"] == 0
    assert r["kv_waits"] > 0 and r["admitted_inflight"] <= 6 and r["reasons"] == {}  # fcfs gives none
    assert torch.get_num_threads() == threads  # the replay ran on one thread and gave the rest back
    # a controller that says why it holds a request: the record counts request-steps per reason
    # (on the computed profile: whether ProgressServe holds anything depends on the step costs,
    # and this machine's tiny profile is measured afresh on a new machine)
    gpu = ["--profile", "h100-llama-3.1-8b"]
    main(["bench", "stream", *args[:-3], "progressserve", "--kv-tokens", "96", *gpu, "--out", str(tmp_path)])
    (r,) = json.loads((tmp_path / "stream.json").read_text())["records"]
    assert r["requests"] == 12 and sum(r["reasons"].values()) > 0
    assert not any(c.isdigit() for why in r["reasons"] for c in why)  # numbers grouped as '#'
    with pytest.raises(SystemExit, match="needs --profile naming a computed GPU profile"):
        main(["bench", "stream", *args[:-1], "gpu", "--out", str(tmp_path)])
    # --kv-offload: preempted requests' KV goes to host memory and comes back, nothing recomputed
    main(["bench", "stream", *args, *gpu, "--kv-offload", "1", "--out", str(tmp_path)])
    (r,) = json.loads((tmp_path / "stream.json").read_text())["records"]
    assert r["requests"] == 12 and r["kv_offloads"] > 0 and r["kv_restores"] == r["kv_offloads"]
    assert r["kv_recomputes"] == 0 and r["kv_copied_gb"] > 0 and r["kv_used"] == 0
    with pytest.raises(SystemExit, match="--kv-offload must be >= 0"):
        main(["bench", "stream", *args, *gpu, "--kv-offload", "-1", "--out", str(tmp_path)])


def test_bench_stream_real_engine_shares_a_kv_pool_and_validates_the_replay(tmp_path):
    """--kv-tokens and --kv-offload on the real engine (issue 33): a scaled-down `long`
    workload on a pool that binds; vllm-v1 waits and preempts by itself, ProgressServe moves
    streams to host memory and back; nothing is lost, and --validate prices the same runs in the
    replay with the same pool."""
    args = ["--tiny", "--validate", "--workload", "long", "--long-scale", "0.02", "--slowdown", "5",
            "--loads", "20", "--requests", "6", "--kv-tokens", "400", "--kv-offload", "0.001",
            "--controllers", "vllm-v1;progressserve"]  # fmt: skip
    main(["bench", "stream", *args, "--out", str(tmp_path)])
    records = json.loads((tmp_path / "stream.json").read_text())["records"]
    engine = {r["controller"]: r for r in records if r["backend"] == "engine"}
    replay = {r["controller"]: r for r in records if r["backend"] == "replay"}
    assert set(engine) == set(replay) == {"vllm-v1", "progressserve"}
    for r in [*engine.values(), *replay.values()]:
        assert r["requests"] == 6 and r["kv_blocks"] == 25 and r["kv_used"] == 0 and r["slo_lateness_s"] == 5.0
    # vllm-v1 admits only what fits (one or two requests here, of 6) and never moves KV;
    # ProgressServe moves streams far ahead of their readers to host memory to admit newcomers,
    # and back. (The time-weighted count depends on step speed: 1.52 with a replay beside it.)
    assert engine["vllm-v1"]["kv_offloads"] == 0 and engine["vllm-v1"]["admitted_inflight"] < 2.0
    assert engine["progressserve"]["kv_offloads"] == engine["progressserve"]["kv_restores"] > 0


def test_bench_spec_trees_runs_tree_controllers_beside_chains(tmp_path, capsys):
    args = ["--tiny", "--trees", "--batches", "1,3", "--temperatures", "0,0.7", "--ks", "2", "--max-new-tokens", "6"]
    args += ["--rounds", "1", "--fixed-trees", "2,2,3", "--tree", "2,2,4"]
    main(["bench", "spec", *args, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "spec_trees.json").read_text())
    names = {r["controller"] for r in data["records"]}
    assert {
        "tree-d2w2n3",
        "tree-d2w2n4,tree-alloc",
        "goodput-tree,tree-alloc",
        "tree-oracle",
        "goodput",
        "oracle",
    } <= names
    for r in data["records"]:
        assert not r["fallbacks"] and r["tokens_per_s"] > 0 and "ratio_best_chain" in r
    chains = [r for r in data["records"] if r["controller"] in ("no-spec", "fixed-k2", "goodput", "fixed-k6,sv")]
    assert max(r["ratio_best_chain"] for r in chains) == 1.0
    oracle = [r for r in data["records"] if r["controller"] == "tree-oracle"]
    assert all(r["oracle_tree"] == "tree-d2w2n3" for r in oracle)
    assert (tmp_path / "spec_trees.png").stat().st_size > 10_000
    assert "ratio_best_chain" in capsys.readouterr().out


def test_bench_spec_slo_trees_adds_adaserve_over_trees(tmp_path):
    args = ["--tiny", "--slo", "--trees", "--slo-requests", "6", "--rate", "100", "--max-new-tokens", "6"]
    main(["bench", "spec", *args, "--slo-controllers", "goodput", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "spec_slo_trees.json").read_text())
    assert [r["controller"] for r in data["records"]] == [
        "goodput", "slo,adaserve", "slo,adaserve-conf", "slo-tree,adaserve-conf"
    ]  # fmt: skip
    assert all(not r["fallbacks"] and r["requests"] == 6 for r in data["records"])


def test_bench_serve_loads_real_servers_over_http(tmp_path, capsys):
    args = ["--tiny", "--rates", "5,50", "--requests", "8", "--stacks", "fcfs;fcfs,fixed-k2"]
    main(["bench", "serve", *args, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "serve.json").read_text())
    runs = {(r["server"], r["rate"]) for r in data["records"]}
    assert runs == {(s, rate) for s in ("adactl[fcfs]", "adactl[fcfs,fixed-k2]") for rate in (5.0, 50.0)}
    for r in data["records"]:
        assert r["requests"] == 8 and r["errors"] == 0 and r["rejected"] == 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] < 2 and r["tokens_per_s"] > 0 and r["units"] > 0
        assert r["capacity_ttft"] == 50.0
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    assert "capacity_ttft" in capsys.readouterr().out


def test_bench_serve_replays_the_servers_loop_on_a_gpu_profile(tmp_path, capsys):
    """--replay: the server's own service and loop on the replay in simulated time, priced by a
    computed H100 profile: H100-sized latencies, speculation that pays there, and the
    service's admission (a burst past --max-queue is answered 429)."""
    args = ["--tiny", "--replay", "--profile", "h100-llama-3.1-8b", "--rates", "2,100000", "--requests", "24",
            "--stacks", "fcfs;fcfs,goodput", "--max-queue", "4"]  # fmt: skip
    main(["bench", "serve", *args, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "serve.json").read_text())
    by = {(r["server"], r["rate"]): r for r in data["records"]}
    assert set(by) == {(s, rate) for s in ("adactl[fcfs]", "adactl[fcfs,goodput]") for rate in (2.0, 100000.0)}
    for server in ("adactl[fcfs]", "adactl[fcfs,goodput]"):
        calm, burst = by[server, 2.0], by[server, 100000.0]
        assert calm["requests"] == 24 and calm["rejected"] == calm["errors"] == 0 and calm["units"] > 0
        assert calm["ttft_p99_s"] < 0.05 and 0.003 < calm["tpot_s"] < 0.012  # an 8B model's step on an H100
        # 4 queue at once (one more once the first step has given the first its first token); the rest refused
        assert 19 <= burst["rejected"] <= 20 and burst["errors"] == 0
    assert by["adactl[fcfs,goodput]", 2.0]["tpot_s"] < 0.9 * by["adactl[fcfs]", 2.0]["tpot_s"]  # drafting pays there
    assert data["meta"]["summary"]["reference"] == "adactl[fcfs]" and data["meta"]["replay"]["truth"] == "GpuStepCost"
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="--profile"):
        main(["bench", "serve", "--tiny", "--replay", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="companion"):
        main(["bench", "serve", "--tiny", "--replay", "--profile", "h100-llama-3.1-8b", "--stacks", "fcfs,fixed-k4,sv",
              "--out", str(tmp_path)])  # fmt: skip


def test_bench_serve_capacity_and_ratios_to_the_peer():
    from adactl.bench.serve import PEER, add_capacity, ratios

    def rec(server, rate, p99, miss):
        return {"server": server, "rate": rate, "ttft_p99_s": p99, "miss_rate": miss}

    records = [rec(PEER, 1, 0.5, 0.0), rec(PEER, 2, 1.5, 0.02), rec(PEER, 3, 4.0, 0.3),
               rec("adactl[x]", 1, 0.4, 0.0), rec("adactl[x]", 2, 0.9, 0.004), rec("adactl[x]", 3, 1.9, 0.01),
               rec("adactl[x]", 4, float("inf"), 0.0)]  # fmt: skip
    add_capacity(records, ttft_target=2.0)
    summary = ratios(records)
    assert summary["peer_capacity_ttft"] == 2
    assert summary["adactl[x]"] == {"capacity_ttft": 3, "capacity_slo": 2, "ratio_ttft": 1.5, "ratio_slo": 1.0}


def test_bench_inprocess_serves_a_stack_open_loop(capsys):
    from adactl.bench import inprocess
    from adactl.cli import build_parser

    args = build_parser().parse_args(["bench", "inprocess", "--tiny", "--draft", "tiny", "--stack", "fcfs,fixed-k2",
                                      "--requests", "6", "--rate", "50", "--ignore-eos"])  # fmt: skip
    summary = inprocess.main(args)
    assert summary["requests"] == 6 and summary["tokens"] > 0 and summary["units"] > 0
    assert summary["verified"] > 0 and set(summary["steps_by_longest_draft"]) <= {0, 1, 2}
    assert "fcfs,fixed-k2 at 50.0/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "inprocess", "--stack", "fcfs,warp"])


def test_capacity_search_finds_the_largest_load_at_slo():
    from adactl.bench.stream import capacity_search

    def at(limit):
        return lambda load: {"load": load, "miss_rate": 0.0 if load <= limit else 0.02, "late_p99_s": 0.0,
                             "rejected": 0}  # fmt: skip

    found, bounded, tried = capacity_search(at(7.3), start=1.0, tolerance=0.05)
    assert bounded and 7.3 * 0.95 <= found <= 7.3 and len(tried) <= 14
    found, bounded, _ = capacity_search(at(0.3), start=4.0, tolerance=0.05)  # start above it: halving first
    assert bounded and 0.3 * 0.95 <= found <= 0.3
    found, bounded, tried = capacity_search(at(float("inf")), start=1.0, limit=5)
    assert not bounded and found == 16.0 and len(tried) == 5  # a lower bound: nothing missed
    assert capacity_search(at(0.0), start=1.0, limit=8)[:2] == (0.0, True)
    found, bounded, tried = capacity_search(at(float("inf")), start=1.0, highest=5.0)  # a finite workload's ceiling
    assert (found, bounded) == (5.0, False) and [r["load"] for r in tried] == [1.0, 2.0, 4.0, 5.0]
    found, bounded, tried = capacity_search(at(7.3), start=3.0, integer=True)  # whole sessions
    assert (found, bounded) == (7.0, True) and all(r["load"] == int(r["load"]) for r in tried)
    assert capacity_search(at(0.5), start=3.0, integer=True)[:2] == (0.0, True)  # not even one session
    with pytest.raises(ValueError, match="whole loads"):
        capacity_search(at(1.0), start=0.5, integer=True)


def test_bench_stream_capacity_by_bisection_with_seeds_and_warm_up(tmp_path, capsys):
    """--capacity: each stack's capacity at SLO by bisection in the replay, seeds pooled, the
    first requests served and not measured; records say how late first tokens came (p99),
    beside in-flight counts and Little's L."""
    args = ["--tiny", "--replay", "--capacity", "--loads", "4", "--requests", "12", "--seeds", "2", "--warmup", "0.25",
            "--workload", "mixed-consumers", "--controllers", "vllm-v1;progressserve"]  # fmt: skip
    main(["bench", "stream", *args, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "stream.json").read_text())
    caps = {c["controller"]: c for c in data["meta"]["capacity"]}
    assert set(caps) == {"vllm-v1", "progressserve"} and all(c["reference"] == "vllm-v1" for c in caps.values())
    for r in data["records"]:
        assert r["seeds"] == 2 and r["requests"] == 24
        assert r["capacity_at_slo"] == caps[r["controller"]]["capacity_at_slo"]
        assert 0 <= r["late_p99_s"] <= r["first_token_late_p99_s"]  # a unit is due no sooner than its first token
        assert r["little_l"] > 0 and r["rejected"] == 0 and "late" not in r and "token_late" not in r
    assert "capacity_at_slo" in capsys.readouterr().out and (tmp_path / "stream.png").is_file()
    refused = [(["--capacity"], "give --replay"), (["--replay", "--seeds", "0"], "--seeds must be"),
               (["--closed-loop", "--loads", "2.5"], "whole"),
               (["--closed-loop", "--loads", "5"], "at most --requests"),
               (["--closed-loop", "--think", "-1"], "--think"),
               (["--closed-loop", "--replay", "--capacity", "--loads", "2"], "at most --requests / 4"),
               (["--workload", "long"], "scale them down"), (["--validate", "--seeds", "2"], "--seeds 1")]  # fmt: skip
    for bad, say in refused:
        with pytest.raises(SystemExit, match=say):
            main(["bench", "stream", "--tiny", "--loads", "2", "--requests", "4", *bad, "--out", str(tmp_path)])


def test_bench_stream_closed_loop_sessions_and_their_capacity(tmp_path, capsys):
    """--closed-loop: each load is a number of sessions that ask, read the reply and think; the
    requests asked per second follow from the sessions (more sessions, more asked), never more
    in flight than sessions; --capacity bisects over whole sessions."""
    args = ["--tiny", "--replay", "--closed-loop", "--think", "2", "--loads", "1,4", "--requests", "16",
            "--controllers", "vllm-v1;progressserve"]  # fmt: skip
    main(["bench", "stream", *args, "--out", str(tmp_path)])
    records = json.loads((tmp_path / "stream.json").read_text())["records"]
    by = {(r["controller"], r["load"]): r for r in records}
    for name in ("vllm-v1", "progressserve"):
        one, four = by[(name, 1.0)], by[(name, 4.0)]
        assert one["requests"] == four["requests"] == 16
        assert four["served_rate"] > 2 * one["served_rate"] > 0  # sessions set the rate
        assert max(n for _, n in one["inflight_timeline"]) <= 1 and max(n for _, n in four["inflight_timeline"]) <= 4
    capsys.readouterr()
    main(["bench", "stream", *args[:5], "--capacity", "--loads", "2", "--requests", "16", "--controllers", "fcfs",
          "--out", str(tmp_path)])  # fmt: skip
    data = json.loads((tmp_path / "stream.json").read_text())
    (cap,) = data["meta"]["capacity"]
    assert cap["capacity_at_slo"] in (0.0, 1.0, 2.0, 3.0, 4.0)  # whole sessions, at most 16 / 4
    assert all(r["load"] == int(r["load"]) and r["load"] <= 4 for r in data["records"])


def test_one_thread_sets_and_gives_back_torchs_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        with one_thread(False):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread():
            raise RuntimeError("a failed run")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
