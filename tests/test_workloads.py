"""The one open-loop driver (`adactl.workloads.OpenLoop`) every bench and the streaming
environment serve through, and the run metrics computed from its results."""

from __future__ import annotations

import sys

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


def test_a_request_the_server_refuses_is_counted_and_the_others_run():
    engine = ReplayEngine(STEP_TIME, max_batch_size=8, seed=0, kv_tokens=160)
    loop = ControlLoop(engine, schedule=[FCFS()], max_draft_len=0, clock=engine.clock)
    work = arrivals([0.0, 0.1, 0.2])
    work[1] = Arrival(0.1, 300, work[1].sampling, work[1].stream)  # more KV than the whole pool
    driver = OpenLoop(loop, work, engine.clock, engine.sleep)
    driver.run()
    assert list(driver.rejected) == [1] and "more KV than the pool" in driver.rejected[1]
    assert sorted(driver.index.values()) == [0, 2] and all(len(r.output_ids) == 6 for r in loop.results.values())


def test_issue_33_workloads_bursts_long_prompts_and_machine_readers():
    from statistics import mean

    from adactl.workloads import consumer_mix, duty_cycle_arrivals, long_requests

    times = duty_cycle_arrivals(4000, 5.0, seed=1)
    assert times == sorted(times) and len(times) / times[-1] == pytest.approx(5.0, rel=0.1)
    phase = [t % 60.0 for t in times]
    peak = sum(p < 18.0 for p in phase) / 18.0  # arrivals per second of the on-phase (30% of each minute)
    assert peak > 3 * sum(p >= 18.0 for p in phase) / 42.0  # 2.5x the mean against 0.36x
    gaps = [b - a for a, b in zip(times, times[1:])]
    cv = (sum((g - mean(gaps)) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean(gaps)
    assert cv > 2.0
    with pytest.raises(ValueError, match="duty-cycle"):
        duty_cycle_arrivals(10, 1.0, peak=4.0)  # 4x the mean for 30% of the time is more than the mean
    lengths = long_requests(500, seed=2)
    assert all(4096 <= p <= 16384 and 300 <= r <= 800 for p, r in lengths)
    assert mean(p for p, _ in lengths) == pytest.approx((16384 - 4096) / 1.386, rel=0.1)  # log-uniform
    readers = consumer_mix(1000, seed=3, tokens_only=True, machines=0.15)
    machines = [s for s in readers if s.rate >= 30]
    assert 0.1 < len(machines) / 1000 < 0.2 and all(s.unit == "token" and s.rate <= 50 for s in readers)
    assert consumer_mix(50, seed=3) == consumer_mix(50, seed=3, machines=0.0)  # the old mix, unchanged


def test_closed_loop_sessions_ask_again_after_reading_and_thinking():
    from adactl.workloads import ClosedLoop

    engine, loop = replay_loop()
    readers = [Stream(r, "token", 1.0) for r in (4.0, 6.0, 8.0)]
    driver = ClosedLoop(loop, arrivals([0.0] * 12, tokens=10), readers, think_s=2.0, seed=3)
    peak = 0

    def on_step(record):
        nonlocal peak
        peak = max(peak, len(record.schedule.requests))

    driver.run(on_step)
    assert len(loop.results) == 12 and len(driver.arrivals) == 12 and not driver.rejected
    assert peak <= 3  # never more requests than sessions
    by_session: dict[int, list] = {}
    for rid, r in loop.results.items():
        pos = driver.index[rid]
        by_session.setdefault(driver.asker[pos], []).append((r, driver.arrivals[pos]))
    assert sorted(by_session) == [0, 1, 2]
    for s, turns in by_session.items():
        turns.sort(key=lambda t: t[0].arrival_time)
        for (r, a), (nxt, _) in zip(turns, turns[1:]):
            assert a.stream == readers[s]  # one reader per session
            # the reader read 10 tokens at its rate from its first deadline (none missed here)
            read = r.arrival_time + 1.0 + 9 / readers[s].rate
            assert r.stream_misses == 0 and r.stream_read_end == pytest.approx(read)
            assert r.stream_read_end >= r.finish_time
            assert nxt.arrival_time > r.stream_read_end  # asks again only after reading and thinking
    gaps = [n[0].arrival_time - t[0].stream_read_end for ts in by_session.values() for t, n in zip(ts, ts[1:])]
    assert 0.5 < sum(gaps) / len(gaps) < 5.0  # think times of mean 2 s
    # the same seed asks at the same times; another seed does not
    again, loop2 = replay_loop()
    ClosedLoop(loop2, arrivals([0.0] * 12, tokens=10), readers, think_s=2.0, seed=3).run()
    times = sorted(r.arrival_time for r in loop.results.values())
    assert sorted(r.arrival_time for r in loop2.results.values()) == pytest.approx(times)
    other, loop3 = replay_loop()
    ClosedLoop(loop3, arrivals([0.0] * 12, tokens=10), readers, think_s=2.0, seed=4).run()
    assert sorted(r.arrival_time for r in loop3.results.values()) != pytest.approx(times)


def test_closed_loop_session_whose_request_is_refused_asks_again_and_bad_settings_are_refused():
    from adactl.workloads import ClosedLoop

    engine = ReplayEngine(STEP_TIME, max_batch_size=8, seed=0, kv_tokens=160)
    loop = ControlLoop(engine, schedule=[FCFS()], max_draft_len=0, clock=engine.clock)
    work = arrivals([0.0] * 5)
    work[0] = Arrival(0.0, 300, work[0].sampling, work[0].stream)  # more KV than the whole pool
    driver = ClosedLoop(loop, work, [Stream(5.0)], think_s=0.5, seed=0)
    driver.run()
    assert list(driver.rejected) == [0] and len(loop.results) == 4  # the one session went on asking
    with pytest.raises(ValueError, match="session"):
        ClosedLoop(loop, work, [], think_s=1.0)
    with pytest.raises(ValueError, match="think_s"):
        ClosedLoop(loop, work, [Stream(5.0)], think_s=float("nan"))
    with pytest.raises(ValueError, match="one per session"):
        ClosedLoop(loop, work, [Stream(5.0)], think_s=1.0, slos=[])


def test_closed_loop_requests_carry_their_sessions_slo():
    from adactl.runtime import SLO
    from adactl.workloads import ClosedLoop

    engine, loop = replay_loop()
    slos = [SLO(priority=0), SLO(priority=1)]
    driver = ClosedLoop(loop, arrivals([0.0] * 6), [Stream(20.0), Stream(30.0)], think_s=0.5, seed=0, slos=slos)
    driver.run()
    assert len(loop.results) == 6
    assert all(a.slo is slos[s] and a.stream.rate == (20.0, 30.0)[s] for a, s in zip(driver.arrivals, driver.asker))


def test_closed_loop_on_the_real_engine_reads_its_consumers_accounts():
    from adactl.workloads import ClosedLoop

    engine = Engine(tiny_llama(), None)
    loop = ControlLoop(engine, schedule=[FCFS()], max_draft_len=0)
    asks = [Arrival(0.0, [1, 2, 3 + i], SamplingParams(5, stop_on_eos=False), None) for i in range(4)]
    driver = ClosedLoop(loop, asks, [Stream(100.0, "token", 0.05)] * 2, think_s=0.01, seed=1)
    peak = 0

    def on_step(record):
        nonlocal peak
        peak = max(peak, len(record.schedule.requests))

    driver.run(on_step)
    assert len(loop.results) == 4 and peak <= 2
    for r in loop.results.values():
        assert r.stream_units == 5 and r.stream_read_end >= max(r.finish_time, r.arrival_time + 0.05 + 4 / 100.0) - 1e-9


class _Odd(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}+{b}")  # (unpickling calls _Odd(message): it does not come back whole)


def _squares(n: int, fail: str = "") -> list[int]:
    import os

    if fail == "odd":
        raise _Odd(1, 2)
    if fail == "raise":
        raise ValueError(f"no squares of {n}")
    if fail == "exit":
        os._exit(3)
    return [i * i for i in range(n)]


def test_prompts_are_built_apart_from_the_serving_process():
    """`built_apart` runs a build in a forked child (ShareGPT read and tokenized in the serving
    process left its k-token steps 12-16% slower, docs/issue30/process_state): its result comes
    back, its error is raised here with its type, and a child that dies is an error, not a hang."""
    import os

    from adactl.workloads import built_apart

    parent = os.getpid()
    assert built_apart(_squares, 5) == [0, 1, 4, 9, 16]
    assert built_apart(os.getpid) != parent  # it did run elsewhere
    with pytest.raises(ValueError, match="no squares of 2") as raised:
        built_apart(_squares, 2, "raise")
    if sys.version_info >= (3, 11):  # where in the child it was raised, as a note
        assert "in _squares" in "".join(raised.value.__notes__)
    with pytest.raises(RuntimeError, match="exited with code 3"):
        built_apart(_squares, 2, "exit")
    with pytest.raises(RuntimeError, match=r"_Odd: 1\+2"):  # an error that does not pickle back: its text
        built_apart(_squares, 2, "odd")
    assert built_apart(_squares, 3) == [0, 1, 4]  # and the next build still works


def _built_in_a_daemon(queue) -> None:
    from adactl.workloads import built_apart

    queue.put(built_apart(_squares, 4))


def test_a_daemonic_process_builds_in_place():
    """A daemonic process (a vectorised environment's worker) may not have children: it builds in place."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    worker = ctx.Process(target=_built_in_a_daemon, args=(queue,), daemon=True)
    worker.start()
    assert queue.get(timeout=60) == [0, 1, 4, 9]
    worker.join(timeout=60)
    assert worker.exitcode == 0
