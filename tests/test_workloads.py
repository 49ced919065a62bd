"""The one open-loop driver (`adactl.workloads.OpenLoop`) every bench and the streaming
environment serve through, and the run metrics computed from its results."""

from __future__ import annotations

import pytest

from adactl import metrics
from adactl.controllers import FCFS
from adactl.estimators.step_time import tiny_step_time
from adactl.loop import ControlLoop
from adactl.runtime import Engine, SamplingParams, Stream
from adactl.runtime.models import tiny_llama
from adactl.runtime.replay import ReplayEngine
from adactl.workloads import Arrival, OpenLoop, arrival_times

STEP_TIME = tiny_step_time()


def replay_loop() -> tuple[ReplayEngine, ControlLoop]:
    engine = ReplayEngine(STEP_TIME, max_batch_size=8, seed=0)
    return engine, ControlLoop(engine, schedule=[FCFS()], max_draft_len=0, clock=engine.clock)


def arrivals(times: list[float], tokens: int = 6) -> list[Arrival]:
    return [Arrival(t, 8, SamplingParams(tokens, stop_on_eos=False, seed=i), Stream(5.0, "token", 1.0))
            for i, t in enumerate(times)]  # fmt: skip


def test_requests_arrive_at_their_times_and_an_idle_server_waits():
    engine, loop = replay_loop()
    times = [0.0, 0.5, 30.0]  # the last comes long after the first two are done
    driver = OpenLoop(loop, arrivals(times), engine.clock, engine.sleep)
    wall = driver.run()
    results = loop.results
    assert len(results) == 3 and sorted(driver.index.values()) == [0, 1, 2]
    for rid, r in results.items():
        assert r.arrival_time == pytest.approx(times[driver.index[rid]])
        assert r.first_token_time >= r.arrival_time and len(r.output_ids) == 6
    assert wall >= 30.0  # it waited (on the replay's clock) for the late arrival


def test_skip_idle_brings_arrivals_forward_keeping_their_spacing():
    engine, loop = replay_loop()
    driver = OpenLoop(loop, arrivals([10.0, 10.5, 40.0], tokens=400), engine.clock, engine.sleep, skip_idle=True)
    steps = 0
    while not driver.done():
        assert driver.step() is not None  # never an idle wait
        steps += 1
    times = sorted(r.arrival_time for r in loop.results.values())
    assert times[0] == pytest.approx(0.0)  # the first came at once
    assert times[1] - times[0] == pytest.approx(0.5)  # spacing kept while busy
    assert times[2] < 40.0 - 10.0  # the idle gap before the third was skipped
    assert steps > 0 and driver.elapsed() < 30.0


def test_real_engine_open_loop_and_its_summary():
    engine = Engine(tiny_llama(), None)
    loop = ControlLoop(engine, schedule=[FCFS()], max_draft_len=0)
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    requests = [Arrival(t, p, SamplingParams(5, stop_on_eos=False), Stream(50.0, "token", 5.0))
                for t, p in zip([0.0, 0.01, 0.02], prompts)]  # fmt: skip
    wall = OpenLoop(loop, requests).run()
    summary = metrics.serving_summary(list(loop.results.values()), wall)
    assert summary["requests"] == 3 and summary["tokens"] == 15
    assert summary[metrics.TTFT_P50] > 0 and summary[metrics.TPOT] > 0
    assert summary["units"] == 15 and summary[metrics.MISS_RATE] == summary["misses"] / 15


def test_arrivals_out_of_order_are_refused():
    engine, loop = replay_loop()
    with pytest.raises(ValueError, match="time order"):
        OpenLoop(loop, arrivals([1.0, 0.5]))
    assert arrival_times(3, 2.0, seed=1) == arrival_times(3, 2.0, seed=1)
