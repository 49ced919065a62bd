"""Streaming: the consumer model, its place in the engine and the replay, and the schedulers."""

from __future__ import annotations

import numpy as np
import pytest

from adactl.controllers import FCFS, AndesPriority, DeadlineFirst, ProgressServe, TTFTPrefillBudget
from adactl.estimators import StepShape
from adactl.interface import ScheduleState
from adactl.loop import ControlLoop
from adactl.runtime import (
    Engine,
    EngineConfig,
    RequestError,
    RequestView,
    SamplingParams,
    StepPlan,
    Stream,
    StreamProgress,
)
from adactl.runtime.replay import ReplayEngine
from adactl.runtime.stream import Playback, count_units

from .helpers import make_engine, prompts


# ---------------------------------------------------------------- consumer model
def test_playback_counts_misses_and_resumes_from_the_late_unit():
    pb = Playback(Stream(rate=2.0, ttft_s=1.0), arrival=0.0)  # units due at 1.0, 1.5, 2.0, ...
    pb.produce(3, 3, now=0.8)  # three units ready before the first deadline
    assert pb.progress(1.6).buffer == 1 and pb.misses == 0  # units 0 and 1 read at 1.0 and 1.5
    assert pb.progress(2.6).misses == 1  # unit 3 was due at 2.5 and is not there
    assert pb.progress(2.9).misses == 1  # still the same stall, under one unit period (0.5 s) long
    pb.produce(5, 5, now=3.0)  # unit 3 arrives late at 3.0; unit 4 with it
    p = pb.progress(3.0)
    assert p.units_read == 4 and p.next_due == pytest.approx(3.5)  # resumed from the late unit
    pb.produce(6, 6, now=3.2, finished=True)
    assert pb.settle() == (6, 1)


def test_a_stall_counts_the_units_its_reader_could_have_read():
    """A stall of d seconds misses ceil(d * rate) units (issue 33), counted as it goes on."""
    pb = Playback(Stream(rate=2.0, ttft_s=1.0), arrival=0.0)  # units due every 0.5 s from 1.0
    pb.produce(1, 1, now=0.9)
    assert pb.progress(3.0).misses == 3  # unit 1 was due at 1.5: 1.5 s of stall so far
    pb.produce(2, 2, now=4.0)  # it came at 4.0: 2.5 s, 5 units
    assert pb.progress(4.0).misses == 5 and pb.stalls == 1
    pb.produce(3, 3, now=4.51)  # due at 4.5, 10 ms late: one unit, unit 2, already in the first stall's
    pb.produce(4, 4, now=4.6, finished=True)
    assert pb.progress(4.6).misses == 5 and pb.stalls == 2
    assert pb.settle() == (4, 3)  # the first stall's units 4 and 5 do not exist: units 1-3 were missed


def test_misses_never_exceed_the_units_of_the_stream():
    """A first token 10 s late at 5 units/s is 50 reads' worth of stall, but a reply of 8 units
    can miss only its 8 (the bench's miss rate is misses / units, a fraction; issue 33's
    ceil(d * rate) counts within the stream). A server at a third of the reading rate stalls
    its reader two periods a unit: every unit is missed, once."""
    pb = Playback(Stream(rate=5.0, ttft_s=1.0), arrival=0.0)
    for i in range(1, 9):
        pb.produce(i, i, now=11.0 + 0.01 * i, finished=i == 8)
    assert pb.settle() == (8, 8) and pb.stalls == 1
    slow = Playback(Stream(rate=5.0, ttft_s=1.0), arrival=0.0)
    for i in range(1, 31):
        slow.produce(i, i, now=1.0 + 0.6 * (i - 1), finished=i == 30)  # the reader's period is 0.2 s
    units, misses = slow.settle()
    assert units == 30 and misses == 29 and slow.stalls == 29  # unit 0 was on time


def test_a_unit_that_never_comes_is_not_a_miss():
    pb = Playback(Stream(rate=2.0, ttft_s=1.0), arrival=0.0)
    pb.produce(1, 1, now=0.5)
    assert pb.progress(2.0).misses == 1  # unit 1 was due at 1.5
    pb.produce(1, 1, now=2.0, finished=True)  # the output ended: there is no unit 1
    assert pb.settle() == (1, 0)


def test_playback_on_time_stream_never_misses():
    pb = Playback(Stream(rate=5.0, ttft_s=0.5), arrival=10.0)
    for i in range(1, 21):
        pb.produce(i, i, now=10.0 + 0.1 * i)  # 10 units/s, faster than the reader
    assert pb.settle() == (20, 0)
    assert pb.progress(12.0).buffer == 20 - pb.read


def test_word_and_sentence_readers_get_one_unit_period_after_the_ttft():
    assert Stream(rate=4.0, unit="token", ttft_s=1.0).first_unit_s == 1.0
    assert Stream(rate=4.0, unit="word", ttft_s=1.0).first_unit_s == 1.25
    sentence = Stream(rate=0.25, unit="sentence", ttft_s=1.0)
    assert sentence.first_unit_s == 5.0
    pb = Playback(sentence, arrival=0.0)
    pb.produce(1, 20, now=4.9)  # a whole sentence 4.9 s in: on time, though long past the TTFT
    pb.produce(2, 40, now=9.5)  # the second was due at 9.0: one miss
    pb.advance(9.5)
    assert pb.misses == 1


def test_units_come_from_the_text():
    assert count_units("word", 5, "Hello there my fri", finished=False) == 3
    assert count_units("word", 5, "Hello there my fri", finished=True) == 4
    assert count_units("word", 3, "Hello there ", finished=False) == 2
    assert count_units("sentence", 9, "One. Two! Thr", finished=False) == 2
    assert count_units("sentence", 9, "One. Two! Thr", finished=True) == 3
    assert count_units("sentence", 4, "One.", finished=False) == 0  # no space after it yet


@pytest.mark.parametrize(
    "stream, match",
    [
        (Stream(rate=0.0), "rate"),
        (Stream(rate=-3.0), "rate"),
        (Stream(rate=float("nan")), "rate"),
        (Stream(rate=5.0, unit="paragraph"), "unit"),
        (Stream(rate=5.0, ttft_s=0.0), "ttft_s"),
        (Stream(rate=5.0, unit="word"), "tokenizer"),  # this engine has none
    ],
)
def test_bad_streams_are_rejected_alone(target, stream, match):
    engine = make_engine(target, None)
    good = engine.add_request([1, 2, 3], SamplingParams(6), stream=Stream(rate=5.0))
    with pytest.raises(RequestError, match=match):
        engine.add_request([4, 5], SamplingParams(6), stream=stream)
    with pytest.raises(RequestError, match="Stream"):
        engine.add_request([4, 5], stream={"rate": 5.0})  # type: ignore[arg-type]
    assert [v.request_id for v in engine.requests()] == [good]
    results = ControlLoop(engine).run()
    assert len(results[good].output_ids) == 6 and results[good].stream_units == 6


def test_engine_keeps_each_consumers_account(target):
    engine = make_engine(target, None)
    patient = Stream(1e-3, ttft_s=1e3)  # first unit due in 1000 s: no machine is that slow
    fast = engine.add_request(prompts(1, seed=3)[0], SamplingParams(12, stop_on_eos=False), stream=patient)
    slow = engine.add_request(prompts(1, seed=4)[0], SamplingParams(12, stop_on_eos=False),
                              stream=Stream(1e6, ttft_s=1e-6))  # fmt: skip
    plain = engine.add_request([1, 2, 3], SamplingParams(4))
    loop = ControlLoop(engine)
    loop.step()
    loop.step()
    views = {v.request_id: v for v in engine.requests()}
    assert views[fast].stream == patient and views[fast].stream_progress.units_ready >= 1
    assert views[plain].stream is None and views[plain].stream_progress is None
    results = loop.run()
    assert results[fast].stream_units == 12 and results[fast].stream_misses == 0
    assert results[slow].stream_misses >= 11  # a reader at a million tokens/s misses nearly every token
    assert results[plain].stream_units is None


# ------------------------------------------------------------------ controllers
def view(rid: str, status: str = "running", rate: float = 5.0, buffer: int = 0, due_in: float = 0.5,
         arrival: float = 0.0, prompt: int = 40, now: float = 10.0) -> RequestView:  # fmt: skip
    """A streamed request at `now`: running with `buffer` tokens ready and the next due in
    `due_in` s, or waiting with nothing computed."""
    if status != "running":
        return RequestView(rid, status, prompt, 0, 0, prompt, arrival, None, SamplingParams(), None, Stream(rate))
    progress = StreamProgress(buffer + 5, 5, now + due_in, 0, 1.0, rate)
    generated = 5 + buffer
    return RequestView(rid, status, prompt, prompt, generated, prompt + generated, arrival, 1.0, SamplingParams(),
                       None, Stream(rate), progress)  # fmt: skip


class LinearCost:
    """A CPU-like step time: 20 ms + 4 ms per decode row + 1 ms per 20 prefill tokens."""

    def predict(self, shapes: list[StepShape]) -> np.ndarray:
        return np.array([0.02 + 0.004 * s.verify_computed + 0.00005 * s.prefill_tokens for s in shapes])


def test_fcfs_admits_in_arrival_order_up_to_max_num_seqs():
    reqs = (view("r0"), view("w1", "waiting", arrival=2.0), view("w0", "waiting", arrival=1.0),
            view("w2", "waiting", arrival=3.0))  # fmt: skip
    plan = FCFS(max_num_seqs=3, prefill_budget=64).act(ScheduleState(10.0, reqs, 0))
    assert list(plan.admit) == ["w0", "w1"] and plan.run is None and plan.prefill_budget == 64
    assert list(FCFS().act(ScheduleState(10.0, reqs, 0)).admit) == ["w0", "w1", "w2"]


def test_deadline_first_and_andes_run_the_most_urgent():
    reqs = (view("safe", buffer=40), view("dry", buffer=0, due_in=0.1), view("mid", buffer=5))
    state = ScheduleState(10.0, reqs, 0)
    assert list(DeadlineFirst(max_running=2).act(state).run) == ["dry", "mid"]
    # andes: lag = expected units by now - generated; "dry" has generated the least
    assert list(AndesPriority(max_running=1).act(state).run) == ["dry"]


def test_progressserve_defers_safe_buffers_and_runs_the_rest():
    # 32 running at ~0.15 s a step make 6.7 tokens/s each: too slow for readers at 8 tokens/s
    at_risk = [view(f"r{i}", buffer=0, due_in=0.3, rate=8.0) for i in range(8)]
    safe = [view(f"s{i}", buffer=60, due_in=0.2, rate=4.0) for i in range(24)]
    ps = ProgressServe(LinearCost())
    plan = ps.act(ScheduleState(10.0, (*at_risk, *safe), 0))
    run = set(plan.run)
    assert {v.request_id for v in at_risk} <= run  # everything at risk runs
    assert len(run) < 32  # and some safe buffers wait (keeping their KV cache)
    # at light load nothing needs deferring: everyone runs
    light = ps.act(ScheduleState(10.0, (*at_risk[:2], *safe[:2]), 0))
    assert set(light.run) == {"r0", "r1", "s0", "s1"}


def test_progressserve_admits_only_what_stays_safe():
    ps = ProgressServe(LinearCost())
    newcomer = view("new", "waiting", arrival=9.9, prompt=40)
    few = tuple(view(f"r{i}", buffer=20, rate=5.0) for i in range(4))
    assert list(ps.act(ScheduleState(10.0, (newcomer, *few), 0)).admit) == ["new"]
    # 60 readers at 8 tokens/s with empty buffers: one more row would push them over the edge
    full = tuple(view(f"r{i}", buffer=0, due_in=0.3, rate=8.0) for i in range(60))
    plan = ps.act(ScheduleState(10.0, (newcomer, *full), 0))
    assert list(plan.admit) == [] and "demand" in ps.reasons["new"]
    # the batch could generate the total, but not fast enough for a 40 tokens/s reader
    slow = tuple(view(f"r{i}", buffer=0, due_in=0.3, rate=3.0) for i in range(30))
    plan = ps.act(ScheduleState(10.0, (newcomer, *slow, view("fast", rate=40.0)), 0))
    assert list(plan.admit) == [] and "risk" in ps.reasons["new"]
    plan = ps.act(ScheduleState(10.0, (newcomer, *slow), 0))
    assert list(plan.admit) == ["new"]
    # a reader faster than even one row can feed (20 ms steps: 50 tokens/s): refused next to
    # others, but admitted (best effort) when nothing is in flight, or it would wait forever
    greedy = view("greedy", "waiting", arrival=9.9, rate=80.0)
    plan = ps.act(ScheduleState(10.0, (greedy, *few), 0))
    assert list(plan.admit) == [] and "nothing in flight" not in ps.reasons["greedy"]
    plan = ps.act(ScheduleState(10.0, (greedy, newcomer), 0))
    assert list(plan.admit) == ["greedy"] and "nothing in flight" in ps.reasons["greedy"]


def test_progressserve_admits_what_this_steps_prefill_budget_can_start():
    # a burst of short prompts on a light load: all of them start now (a fixed two a step held
    # newcomers back on a GPU's large batch, where chat ran at most 2 admissions per 18 ms step)
    few = tuple(view(f"r{i}", buffer=20, rate=5.0) for i in range(4))
    burst = tuple(view(f"w{i}", "waiting", arrival=9.0 + i / 100, prompt=40) for i in range(6))
    ps = ProgressServe(LinearCost(), prefill_budget=512)
    assert list(ps.act(ScheduleState(10.0, (*burst, *few), 0)).admit) == [f"w{i}" for i in range(6)]
    # long prompts: admitted until the budget is spent (the last one chunked), the rest wait
    long = tuple(view(f"l{i}", "waiting", arrival=9.0 + i / 100, prompt=300) for i in range(4))
    plan = ps.act(ScheduleState(10.0, (*long, *few), 0))
    assert list(plan.admit) == ["l0", "l1"] and "prefill budget" in ps.reasons["l2"]
    # the server's batch is full but for two rows: two start, and the step is priced without
    # the others' prompts (admitted without a row, they would not start)
    plan = ps.act(ScheduleState(10.0, (*burst, *few), 0, max_batch=6))
    assert list(plan.admit) == ["w0", "w1"] and ps.reasons["w2"] == "no free row in the server's batch"
    # a fixed limit a step is still there for who wants one
    capped = ProgressServe(LinearCost(), prefill_budget=512, admit_per_step=2)
    assert list(capped.act(ScheduleState(10.0, (*burst, *few), 0)).admit) == ["w0", "w1"]


def test_ttft_budget_is_the_smallest_that_keeps_every_deadline():
    ctl = TTFTPrefillBudget(LinearCost(), max_budget=512, min_budget=16)
    running = tuple(view(f"r{i}") for i in range(8))

    def waiting(deadline_in: float, prompt: int = 200) -> RequestView:  # first unit due 1 s after arrival
        return view("w", "waiting", arrival=10.0 + deadline_in - 1.0, prompt=prompt)

    # 200 tokens due in 0.9 s; steps of ~0.053 s leave 17 steps: 16 tokens a step suffice
    assert ctl.budget(ScheduleState(10.0, (waiting(0.9), *running), 0)) == 16
    # due in 0.2 s: 3 steps, so 200 tokens need 128 a step (64 * 3 = 192 falls short)
    assert ctl.budget(ScheduleState(10.0, (waiting(0.2), *running), 0)) == 128
    # a deadline already lost: the largest budget, to catch up; nothing waiting: the smallest
    assert ctl.budget(ScheduleState(10.0, (waiting(-1.0), *running), 0)) == 512
    assert ctl.budget(ScheduleState(10.0, running, 0)) == 16
    # a sentence reader's first unit (20 tokens, due one period after the TTFT) needs 19 decode
    # steps after its first token, and its first token is still due at the TTFT
    # (0.9 s to its first token: 13 steps of 0.053 s; 1.9 s to its first sentence: 28 - 19 = 9)
    sentence = RequestView("s", "waiting", 200, 0, 0, 200, 9.9, None, SamplingParams(), None,
                           Stream(1.0, "sentence"), StreamProgress(0, 0, 0.0, 0, 20.0, 1.0))  # fmt: skip
    assert ctl.budget(ScheduleState(10.0, (sentence, *running), 0)) == 32  # 9 steps x 32 >= 200
    token = RequestView("t", "waiting", 200, 0, 0, 200, 9.9, None, SamplingParams(), None, Stream(1.0))
    assert ctl.budget(ScheduleState(10.0, (token, *running), 0)) == 16  # 13 steps x 16 >= 200


class ChunkOverhead:
    """An engine that runs each prefill chunk as its own forward: 70 ms, then 2 ms a token."""

    def predict(self, shapes: list[StepShape]) -> np.ndarray:
        return np.array([0.05 + (0.07 + 0.002 * s.prefill_tokens if s.prefill_tokens else 0.0) for s in shapes])


def test_ttft_budget_does_not_pay_a_chunk_overhead_for_nothing():
    ctl = TTFTPrefillBudget(ChunkOverhead(), max_budget=512, min_budget=16)
    w = view("w", "waiting", arrival=10.0 + 30.0, prompt=300)  # due in 31 s: any budget is in time
    # cost per prompt token: 16 -> 6.4 ms, 64 -> 3.1, 128 -> 2.5, 256 -> 2.3, 512 -> 2.1; the
    # smallest within 25% of the cheapest is 128
    assert ctl.budget(ScheduleState(10.0, (w,), 0)) == 128
    assert TTFTPrefillBudget(ChunkOverhead(), cost_slack=10.0).budget(ScheduleState(10.0, (w,), 0)) == 16


# ------------------------------------------------------------------- replay
def test_replay_engine_runs_the_loop_deterministically():
    def run(seed: int) -> tuple[float, list[int]]:
        engine = ReplayEngine(LinearCost(), alpha=[0.7, 0.5], noise=0.1, seed=seed)
        for i in range(6):
            engine.add_request(30 + i, SamplingParams(10 + i, stop_on_eos=False), arrival_time=0.0,
                               stream=Stream(5.0))  # fmt: skip
        results = ControlLoop(engine, schedule=[ProgressServe(LinearCost())], clock=engine.clock).run()
        assert all(len(r.output_ids) == 10 + int(rid.split("-")[1]) for rid, r in results.items())
        return engine.now, [results[f"req-{i}"].stream_misses for i in range(6)]

    assert run(0) == run(0)
    assert run(0)[0] != run(1)[0]
    engine = ReplayEngine(LinearCost())
    with pytest.raises(RequestError, match="rate"):
        engine.add_request(10, stream=Stream(rate=0.0))
    with pytest.raises(RequestError, match="prompt length"):
        engine.add_request(0)
    assert not engine.has_unfinished()


def test_progressserve_moves_the_largest_buffer_off_the_device_to_admit_a_newcomer_and_brings_it_back():
    """Memory as a lever (issue 33): with the KV pool full, the stream furthest ahead of its
    reader goes to host memory (or is preempted where there is none) so a newcomer gets its
    blocks; an offloaded stream comes back once its slack is down to the copy time."""
    from dataclasses import replace

    from adactl.runtime.types import KVState

    ps = ProgressServe(LinearCost())
    ahead, behind = view("ahead", buffer=200, rate=5.0), view("behind", buffer=2, rate=5.0)  # 40 s and 0.9 s of slack
    newcomer = view("new", "waiting", rate=5.0, arrival=9.9, prompt=60)
    host = KVState(16, total_blocks=20, free_blocks=4, host_free_tokens=10_000, copy_s_per_token=1e-3)
    plan = ps.act(ScheduleState(10.0, (newcomer, ahead, behind), 0, kv=host))
    assert plan.offload == ["ahead"] and plan.preempt == [] and "new" in plan.admit
    assert "ahead" not in plan.run and "behind" in plan.run
    no_host = KVState(16, total_blocks=20, free_blocks=4)
    plan = ps.act(ScheduleState(10.0, (newcomer, ahead, behind), 0, kv=no_host))
    assert plan.preempt == ["ahead"] and plan.offload == [] and "new" in plan.admit
    # nobody has the slack to be moved: the newcomer waits, and says why
    plan = ps.act(ScheduleState(10.0, (newcomer, behind), 0, kv=host))
    assert plan.offload == [] and "new" not in plan.admit and "KV blocks" in ps.reasons["new"]
    # an offloaded stream whose buffer is nearly read comes back; one far ahead stays off while the queue needs room
    away = [replace(view(rid, buffer=b), status="offloaded", kv="host") for rid, b in (("soon", 2), ("later", 150))]
    roomy = KVState(16, total_blocks=40, free_blocks=20, host_free_tokens=10_000, copy_s_per_token=1e-3)
    plan = ps.act(ScheduleState(10.0, (newcomer, *away, behind), 0, kv=roomy))
    assert plan.restore == ["soon"] and "new" in plan.admit
    # with memory to spare, both come back (buffers grow while memory is free)
    plan = ps.act(ScheduleState(10.0, (*away, behind), 0, kv=replace(roomy, free_blocks=36)))
    assert sorted(plan.restore) == ["later", "soon"]
    # without the lever (or a pool), nothing moves
    plan = ProgressServe(LinearCost(), memory=False).act(ScheduleState(10.0, (newcomer, ahead, behind), 0, kv=host))
    assert plan.offload == plan.preempt == plan.restore == ()


def test_tokenflow_admits_in_arrival_order_making_room_from_the_largest_buffer():
    """The TokenFlow-like stack: FCFS admission with ProgressServe's memory lever and nothing
    else (no servability test, no deferral)."""
    from adactl.controllers import BufferOffload
    from adactl.runtime.types import KVState

    ahead, behind = view("ahead", buffer=200), view("behind", buffer=2)
    first = view("first", "waiting", arrival=9.0, prompt=60)
    second = view("second", "waiting", arrival=9.5, prompt=600)  # 38 blocks: more than any move frees
    kv = KVState(16, total_blocks=30, free_blocks=4, host_free_tokens=10_000, copy_s_per_token=1e-3)
    plan = BufferOffload(LinearCost()).act(ScheduleState(10.0, (second, first, ahead, behind), 0, kv=kv))
    assert plan.offload == ["ahead"] and list(plan.admit) == ["first"] and plan.run is None
    plan = BufferOffload(LinearCost()).act(ScheduleState(10.0, (first, ahead, behind), 0))  # no KV report
    assert list(plan.admit) == ["first"] and plan.offload == ()


def test_the_memory_lever_keeps_blocks_for_prompts_part_way_through_prefill():
    """A stream is not restored into the blocks a prompt's next prefill chunk needs (found in
    the long workload: the restored stream stalled the newcomer it had made room for)."""
    from dataclasses import replace

    from adactl.runtime.types import KVState

    soon = replace(view("soon", buffer=2), status="offloaded", kv="host")  # 0.9 s of slack: due back
    behind = view("behind", buffer=2)
    half = replace(view("half", "waiting", prompt=320), status="prefilling", prefilled=160)  # 11 blocks to go
    kv = KVState(16, total_blocks=40, free_blocks=12, host_free_tokens=10_000, copy_s_per_token=1e-3)
    ps = ProgressServe(LinearCost())
    assert ps.act(ScheduleState(10.0, (soon, behind), 0, kv=kv)).restore == ["soon"]
    assert ps.act(ScheduleState(10.0, (half, soon, behind), 0, kv=kv)).restore == []


def test_a_stream_due_back_is_restored_before_a_newcomer_takes_its_blocks():
    """The memory lever brings back a stream whose buffer is nearly read before it admits
    anyone (found by review: admissions spent the free blocks first, so under steady arrivals
    an offloaded stream could wait for ever)."""
    from dataclasses import replace

    from adactl.runtime.types import KVState

    soon = replace(view("soon", buffer=2), status="offloaded", kv="host")  # 0.9 s of slack, 3 blocks
    newcomer = view("new", "waiting", rate=5.0, arrival=9.9, prompt=60)  # 4 blocks
    behind = view("behind", buffer=2)
    kv = KVState(16, total_blocks=40, free_blocks=5, host_free_tokens=10_000, copy_s_per_token=1e-3)
    plan = ProgressServe(LinearCost()).act(ScheduleState(10.0, (newcomer, soon, behind), 0, kv=kv))
    assert plan.restore == ["soon"] and "new" not in plan.admit


def test_without_its_memory_lever_progressserve_readmits_streams_the_server_moved_off():
    """A server may preempt or offload by itself (the replay's vLLM rule): without the lever,
    ProgressServe must admit those streams again like any other, or they never finish (from
    review)."""
    from dataclasses import replace

    from adactl.runtime.types import KVState

    gone = replace(view("gone", buffer=3), status="offloaded", kv="host")
    redo = replace(view("redo", buffer=3), status="waiting", kv="none", prefilled=0)  # preempted, output kept
    kv = KVState(16, total_blocks=40, free_blocks=30, host_free_tokens=10_000, copy_s_per_token=1e-3)
    plan = ProgressServe(LinearCost(), memory=False).act(ScheduleState(10.0, (gone, redo, view("r")), 0, kv=kv))
    assert {"gone", "redo"} <= set(plan.admit) and plan.restore == ()


def test_the_replay_counts_the_kv_the_engines_row_moves_copy(target):
    """A scheduler that runs a different subset each step (Andes' largest lags) makes the engine
    copy the KV of every row that changes segment (`Rows.arrange`), and a finished row's place
    is taken by the last (`Rows.drop`): its decode steps at 14 rows ran 35-40% over a profile
    that priced no copies (issue 32). The engine reports the columns copied
    (`StepOutcome.moved_tokens`), the replay counts the same moves, and the step-cost basis
    prices them (`kv_moved`)."""
    engine = Engine(target, None, config=EngineConfig(max_batch_size=8, seed=0))
    replay = ReplayEngine(LinearCost())
    ids = []
    for i in range(6):
        sampling = SamplingParams(max_new_tokens=12 + 2 * i, stop_on_eos=False)
        ids.append((engine.add_request([1 + i] * 16, sampling), replay.add_request([1 + i] * 16, sampling)))
    plans = [None, None, [0, 1, 2], [0, 1, 2], [3, 4, 5], [0, 4, 5], [1, 2, 3], *[None] * 12]
    seen = []
    for which in plans:
        outcomes = [e.step(StepPlan(draft_len=0, prefill_budget=128, run=None if which is None else
                                    [pair[side] for pair in map(ids.__getitem__, which)]))
                    for side, e in enumerate((engine, replay))]  # fmt: skip
        seen.append(tuple(o.moved_tokens for o in outcomes))
    mine, theirs = zip(*seen)
    assert mine[:4] == (0, 0, 0, 0) and all(m > 0 for m in mine[4:7]) and mine[7] == 0  # a new subset moves rows
    assert [m > 0 for m in mine[:8]] == [m > 0 for m in theirs[:8]]  # the same steps move rows,
    assert sum(mine[7:]) > 0 and sum(theirs[7:]) > 0  # and so do finished rows (the replay: its next step)
    assert sum(theirs) == pytest.approx(sum(mine), rel=0.1)  # as many (the replay's width: the longest context)
    assert StepShape.of_lengths([0], [0], moved=64).moved_tokens == 64
