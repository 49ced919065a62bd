"""KV memory as blocks (adactl.runtime.kv_pool) and the replay bounded by it: the batch is
capped by memory, prompts wait for blocks, growth preempts by recompute, nothing is lost."""

from __future__ import annotations

import dataclasses

import pytest

from adactl.estimators import gpu_cost
from adactl.estimators.step_time import tiny_step_time
from adactl.runtime import SamplingParams, StepPlan
from adactl.runtime.kv_pool import HostOffload, KVPool, kv_tokens_for
from adactl.runtime.replay import ReplayEngine
from adactl.runtime.types import RequestError
from tests.helpers import greedy_reference


def test_pool_blocks():
    pool = KVPool.of_tokens(100)  # 6 blocks of 16
    assert pool.total_blocks == 6 and pool.free == 6
    assert pool.grow("a", 17) and pool.held["a"] == 2
    assert pool.grow("a", 10) and pool.held["a"] == 2  # never shrinks
    assert not pool.fits("b", 65) and not pool.grow("b", 65) and "b" not in pool.held
    assert pool.grow("b", 64) and pool.free == 0
    assert pool.release("a") == 2 and pool.free == 2
    with pytest.raises(ValueError):
        KVPool.of_tokens(8)


def test_gpu_sizing():
    cost = gpu_cost.shipped_gpu_profile("h100-llama-3.1-8b")
    assert 400_000 < cost.kv_tokens() < 460_000  # (72 GB - 16 GB) / 131,072 B
    assert 400_000 < gpu_cost.shipped_gpu_profile("h100x4-llama-3.1-70b").kv_tokens() < 500_000  # 327,680 B a token
    with pytest.raises(ValueError, match="no room for KV"):
        kv_tokens_for(16e9, 16e9, 131072)


def _serve(engine, n=8, prompt=64, new=64):
    for _ in range(n):
        engine.add_request(prompt, SamplingParams(new))
    most = 0
    while engine.has_unfinished():
        engine.step(StepPlan(draft_len=2, prefill_budget=512))
        most = max(most, sum(v.status == "running" for v in engine.requests()))
    return engine.pop_finished(), most


def test_the_batch_is_bounded_by_memory_and_nothing_is_lost():
    free, most_free = _serve(ReplayEngine(tiny_step_time(), alpha=[0.6, 0.5], seed=0))
    engine = ReplayEngine(tiny_step_time(), alpha=[0.6, 0.5], seed=0, kv_tokens=320)
    results, most = _serve(engine)
    assert most_free == 8 and most <= 5  # 320 tokens hold 5 prompts of 64, fewer once they grow
    assert len(results) == 8 and all(len(r.output_ids) == 64 and r.finish_reason == "length" for r in results)
    stats = engine.kv_stats()
    assert stats["kv_waits"] > 0 and stats["kv_recomputes"] > 0 and stats["kv_used"] == 0
    assert engine.clock() > ReplayEngine(tiny_step_time(), alpha=[0.6, 0.5]).clock()


def test_a_request_larger_than_the_pool_is_refused_alone():
    engine = ReplayEngine(tiny_step_time(), kv_tokens=256)
    with pytest.raises(RequestError, match="need more KV than the pool"):
        engine.add_request(200, SamplingParams(100))
    engine.add_request(100, SamplingParams(100))
    while engine.has_unfinished():
        engine.step(StepPlan(prefill_budget=512))
    assert len(engine.pop_finished()[0].output_ids) == 100


def test_offload_resumes_preempted_requests_without_a_prefill():
    """Preemption by offload: the KV goes to host memory while it has room and comes back at
    the copy's cost, so nothing is recomputed; with no host room it is recompute, as before."""

    def run(offload):
        engine = ReplayEngine(tiny_step_time(), alpha=[0.6, 0.5], seed=0, kv_tokens=320, offload=offload)
        return engine, _serve(engine)[0]

    recompute, _ = run(None)
    engine, results = run(HostOffload(host_tokens=10_000, kv_bytes_per_token=131072))
    stats = engine.kv_stats()
    assert len(results) == 8 and all(len(r.output_ids) == 64 and r.finish_reason == "length" for r in results)
    assert stats["kv_offloads"] > 0 and stats["kv_restores"] == stats["kv_offloads"] and stats["kv_recomputes"] == 0
    assert stats["kv_used"] == 0 and not engine.offload.held and stats["kv_copied_gb"] > 0
    nowhere, _ = run(HostOffload(host_tokens=0, kv_bytes_per_token=131072))
    assert nowhere.kv_stats()["kv_offloads"] == 0
    assert nowhere.kv_stats()["kv_recomputes"] == recompute.kv_stats()["kv_recomputes"] > 0
    # the copies are on the clock: the same run over a 1 MB/s link takes longer by exactly their time
    slow, _ = run(HostOffload(host_tokens=10_000, kv_bytes_per_token=131072, bytes_per_s=1e6))
    copied = slow.kv_stats()["kv_copied_gb"] * 1e9
    assert copied == stats["kv_copied_gb"] * 1e9
    assert slow.clock() - engine.clock() == pytest.approx(copied / 1e6 - copied / 25e9, rel=1e-6)
    with pytest.raises(ValueError, match="needs a KV pool"):
        ReplayEngine(tiny_step_time(), offload=HostOffload(10, 131072))
    with pytest.raises(ValueError, match="host offload needs"):
        HostOffload(-1, 131072)


def _views(engine):
    return {v.request_id: v for v in engine.requests()}


def test_preempt_offload_and_restore_are_plan_actions_and_nothing_is_lost():
    """StepPlan.preempt drops a request's KV (it prefills prompt + output again), offload
    copies it to host memory beside compute and restore brings it back, decoding once the
    copy is done; every request still ends with its whole output (issue 33)."""
    mb_per_token = 1e6  # a 1 MB/s link, 1 MB a token: one second a token each way, easy to see
    engine = ReplayEngine(tiny_step_time(), seed=0, kv_tokens=640,
                          offload=HostOffload(host_tokens=100, kv_bytes_per_token=mb_per_token,
                                              bytes_per_s=1e6))  # fmt: skip
    for rid in "abc":
        engine.add_request(64, SamplingParams(40), request_id=rid)
    engine.step(StepPlan(prefill_budget=512))
    for _ in range(3):
        engine.step(StepPlan(prefill_budget=0))
    state = engine.kv_state()
    assert state.total_blocks == 40 and state.free_blocks == 40 - 3 * 5 and state.host_free_tokens == 100
    assert state.copy_s_per_token == 1.0
    issued = engine.clock()
    engine.step(StepPlan(prefill_budget=0, offload=["a"], preempt=["b"]))
    views = _views(engine)
    assert (views["a"].status, views["a"].kv) == ("offloaded", "host")
    assert (views["b"].status, views["b"].kv, views["b"].num_generated) == ("waiting", "none", 4)
    assert engine.kv_state().free_blocks == 40 - 5 and engine.kv_state().host_free_tokens == 100 - 68
    assert engine.kv_stats()["kv_offloads"] == 1 and engine.kv_stats()["kv_recomputes"] == 1
    for _ in range(2):  # both stay off the device while the plans leave them there
        engine.step(StepPlan(prefill_budget=0, admit=[]))
    assert _views(engine)["a"].num_generated == _views(engine)["b"].num_generated == 4
    now = engine.clock()
    engine.step(StepPlan(prefill_budget=0, admit=[], restore=["a"]))
    a = _views(engine)["a"]  # the copy back starts once its copy out (68 s from `issued`) is done
    assert a.status == "restoring" and a.kv == "device" and a.kv_ready_at == pytest.approx(issued + 68.0 + 68.0)
    assert now < issued + 68.0
    assert engine.kv_state().host_free_tokens == 100
    steps = 0
    while _views(engine)["a"].status == "restoring":  # decodes only once its 68 s copy is done
        engine.step(StepPlan(prefill_budget=0, admit=[]))
        steps += 1
    assert steps > 10 and engine.clock() >= issued + 136.0 and _views(engine)["a"].num_generated == 4
    while engine.has_unfinished():
        engine.step(StepPlan(prefill_budget=512))
    results = {r.request_id: r for r in engine.pop_finished()}
    assert all(len(results[rid].output_ids) == 40 and results[rid].finish_reason == "length" for rid in "abc")
    assert engine.kv_stats()["kv_used"] == 0 and engine.kv_stats()["kv_restores"] == 1


def test_bad_moves_are_refused_before_anything_changes_and_a_full_host_refuses_an_offload():
    engine = ReplayEngine(tiny_step_time(), seed=0, kv_tokens=160,
                          offload=HostOffload(host_tokens=70, kv_bytes_per_token=131072))  # fmt: skip
    for rid in "ab":
        engine.add_request(64, SamplingParams(30), request_id=rid)
    engine.step(StepPlan(prefill_budget=512))
    before = (engine.kv_state(), [(v.request_id, v.status) for v in engine.requests()])
    for plan, match in [(StepPlan(preempt=["zz"]), "not running"), (StepPlan(restore=["a"]), "not offloaded"),
                        (StepPlan(offload=["a"], preempt=["a"]), "more than once")]:  # fmt: skip
        with pytest.raises(RequestError, match=match):
            engine.step(plan)
        assert (engine.kv_state(), [(v.request_id, v.status) for v in engine.requests()]) == before
    engine.step(StepPlan(prefill_budget=0, offload=["a", "b"]))  # the host holds one of them (70 tokens)
    views = _views(engine)
    assert views["a"].status == "offloaded" and views["b"].status == "running"
    assert engine.kv_stats()["kv_offload_refused"] == 1
    engine.add_request(40, SamplingParams(20), request_id="c")  # takes 3 of the 5 blocks "a" left
    engine.step(StepPlan(prefill_budget=512, admit=["c"]))
    with pytest.raises(RequestError, match="needs 5 KV blocks and 2 are free"):
        engine.step(StepPlan(restore=["a"]))  # 5 blocks, 2 free
    without_host = ReplayEngine(tiny_step_time(), kv_tokens=160)
    without_host.add_request(10, SamplingParams(5), request_id="x")
    without_host.step(StepPlan())
    with pytest.raises(RequestError, match="need host memory"):
        without_host.step(StepPlan(offload=["x"]))
    while engine.has_unfinished():
        engine.step(StepPlan(prefill_budget=512))
    assert sorted(len(r.output_ids) for r in engine.pop_finished()) == [20, 30, 30]


def _random_moves(engine, seed: int, max_k: int = 3, budget: int = 16, steps: int = 2000) -> None:
    """Step `engine` to completion with random draft lengths, a small prefill budget and, on
    random steps, random preempt, offload and restore moves (restores only where their blocks
    are free, offloads only with host memory)."""
    import random

    rng = random.Random(seed)
    for _ in range(steps):
        if not engine.has_unfinished():
            return
        views = engine.requests()
        running = [v.request_id for v in views if v.status == "running"]
        offloaded = [v for v in views if v.status == "offloaded"]
        plan = StepPlan(draft_len={r: rng.randint(0, max_k) for r in running}, prefill_budget=budget)
        moves = rng.sample(running, min(len(running), rng.randint(0, 2))) if rng.random() < 0.15 else []
        if moves:
            cut = rng.randint(0, len(moves))
            host = engine.host is not None
            plan = dataclasses.replace(
                plan, preempt=moves[:cut] if host else moves, offload=moves[cut:] if host else []
            )
        state = engine.kv_state()
        free = state.free_blocks + sum(engine.kv.held.get(r, 0) for r in [*plan.preempt, *plan.offload])
        back = []
        for v in offloaded:
            need = state.blocks_for(v.context_len + 1)
            if rng.random() < 0.5 and need <= free:
                back.append(v.request_id)
                free -= need
        plan = dataclasses.replace(plan, restore=back, admit=[v.request_id for v in views if v.status in
                                                             ("waiting", "prefilling")])  # fmt: skip
        engine.step(plan)
    raise AssertionError("did not finish")


@pytest.mark.parametrize("kv_tokens,host,graphs", [(4096, 4096, False), (160, 64, False), (160, 0, True)],
                         ids=["moves", "tight-offload", "tight-recompute-static"])  # fmt: skip
def test_engine_greedy_output_after_preempt_offload_and_restore_equals_generate(target, draft, kv_tokens, host, graphs):
    """Lossless across KV moves: requests preempted (prompt and output prefilled again),
    offloaded and restored by the plan, and by the pool itself where it is too small for the
    batch to grow, each yield what `generate` yields for it alone."""
    from tests.helpers import make_engine, prompts

    ps = [p + [5] * 20 for p in prompts(6, seed=4)]
    refs = [greedy_reference(target, p, 30) for p in ps]
    engine = make_engine(target, draft, kv_tokens=kv_tokens, host_kv_tokens=host, graphs=graphs)
    ids = [engine.add_request(p, SamplingParams(30)) for p in ps]
    _random_moves(engine, seed=kv_tokens + host)
    done = {r.request_id: r.output_ids for r in engine.pop_finished()}
    assert [done[i] for i in ids] == refs
    stats = engine.kv_stats()
    assert stats["kv_used"] == 0  # everything given back
    assert stats["kv_recomputes"] > 0
    if host:
        assert stats["kv_offloads"] > 0 and stats["kv_restores"] > 0
    if kv_tokens == 160:  # 10 blocks for 6 requests of up to 62 tokens: the pool preempted and made prompts wait
        assert stats["kv_waits"] > 0


def test_engine_moves_with_a_feature_draft_stay_lossless(target):
    from adactl.runtime.feature_draft import FeatureDraft
    from tests.helpers import make_engine, prompts
    from tests.test_feature_draft import reduced_vocab

    fd = FeatureDraft.from_target(
        target, reduced_vocab(), intermediate_size=64, seed=3, feature_layers=[0, 1, 2]
    ).eval()
    ps = [p + [7] * 10 for p in prompts(4, seed=2)]
    refs = [greedy_reference(target, p, 24) for p in ps]
    engine = make_engine(target, fd, kv_tokens=2048, host_kv_tokens=2048)
    ids = [engine.add_request(p, SamplingParams(24)) for p in ps]
    _random_moves(engine, seed=9)
    done = {r.request_id: r.output_ids for r in engine.pop_finished()}
    assert [done[i] for i in ids] == refs
    assert engine.kv_stats()["kv_offloads"] > 0 and engine.kv_stats()["kv_recomputes"] > 0


def test_engine_refuses_bad_moves_and_oversized_requests_alone(target, draft):
    """Bad input against the engine's pool: a request that cannot fit is refused alone; moves
    naming unknown, finished or already-moved requests are refused before anything changes
    (and by the control loop, which falls back and counts it); a full host refuses an offload,
    counted, and the request keeps running."""
    from adactl.interface import Controller
    from adactl.loop import ControlLoop
    from tests.helpers import make_engine

    engine = make_engine(target, draft, kv_tokens=160, host_kv_tokens=30)
    with pytest.raises(RequestError, match="need more KV than the pool"):
        engine.add_request([3] * 100, SamplingParams(80))
    a = engine.add_request([1, 2, 3, 4] * 5, SamplingParams(12), request_id="a")
    b = engine.add_request([5, 6, 7] * 5, SamplingParams(12), request_id="b")
    engine.step(StepPlan(prefill_budget=64))
    before = (engine.kv_state(), [(v.request_id, v.status) for v in engine.requests()])
    for plan, match in [(StepPlan(preempt=["zz"]), "not running"), (StepPlan(restore=[a]), "not offloaded"),
                        (StepPlan(offload=[a], preempt=[a]), "more than once")]:  # fmt: skip
        with pytest.raises(RequestError, match=match):
            engine.step(plan)
        assert (engine.kv_state(), [(v.request_id, v.status) for v in engine.requests()]) == before
    engine.step(StepPlan(offload=[a, b]))  # the host holds one of them (30 tokens; 21 and 16 asked)
    status = {v.request_id: v.status for v in engine.requests()}
    assert status == {a: "offloaded", b: "running"} and engine.kv_stats()["kv_offload_refused"] == 1
    assert engine.kv_state().host_free_tokens == 9
    va = next(v for v in engine.requests() if v.request_id == a)  # as the replay says: all of it computed
    assert va.kv == "host" and va.prompt_len == va.prefilled == va.context_len == 21

    class PreemptTwice(Controller):
        def act(self, state, utilities):
            return StepPlan(preempt=[v.request_id for v in state.running] * 2, prefill_budget=64)

    loop = ControlLoop(engine, PreemptTwice())
    results = loop.run()
    assert sorted(len(r.output_ids) for r in results.values()) == [12, 12]  # nothing lost
    assert loop.fallbacks["schedule:PreemptTwice"] >= 1  # refused, counted, the safe plan ran
    assert engine.kv_stats()["kv_used"] == 0 and engine.kv_state().host_free_tokens == 30
    no_pool = make_engine(target, draft)
    rid = no_pool.add_request([1, 2, 3], SamplingParams(4))
    no_pool.step(StepPlan())
    with pytest.raises(RequestError, match="need a KV pool"):
        no_pool.step(StepPlan(preempt=[rid]))
    with pytest.raises(ValueError, match="kv_tokens must be"):
        make_engine(target, draft, kv_tokens=8)
    with pytest.raises(ValueError, match="needs a KV pool"):
        make_engine(target, draft, host_kv_tokens=100)


def _loop(engine, controller):
    from adactl.loop import ControlLoop

    return ControlLoop(engine, controller, max_draft_len=0, clock=engine.clock)


def test_vllm_v1_admits_whole_sequences_in_order_and_blocks_the_line():
    """A 10-block pool: A (7 blocks) is admitted, B (4) does not fit, and C (1), which would,
    waits behind it: vLLM v1's head-of-line `break`."""
    from adactl.controllers import VLLMv1

    engine = ReplayEngine(tiny_step_time(), seed=0, kv_tokens=160)
    for rid, n in (("A", 100), ("B", 60), ("C", 10)):
        engine.add_request(n, SamplingParams(8), request_id=rid)
    loop = _loop(engine, VLLMv1())
    record = loop.step()
    assert list(record.plan.admit) == ["A"] and record.schedule.kv.free_blocks == 10
    assert [v.status for v in engine.requests()] == ["waiting", "waiting", "running"]  # B, C wait; A runs
    results = loop.run()
    assert sorted((rid, len(r.output_ids)) for rid, r in results.items()) == [("A", 8), ("B", 8), ("C", 8)]
    assert engine.kv_stats()["kv_recomputes"] == 0


def test_vllm_v1_preempts_the_last_admitted_by_recompute_and_admits_nothing_that_step():
    """An 8-block pool holding A (4 blocks) and B (3) grows out of blocks: B, admitted last, is
    preempted by recompute (to the head of the queue, output kept) in a step that admits
    nothing, comes back once A finishes, and both end whole. The plan preempts before the
    replay has to (its own last-admitted rule never fires)."""
    from adactl.controllers import VLLMv1

    engine = ReplayEngine(tiny_step_time(), seed=0, kv_tokens=128)
    engine.add_request(60, SamplingParams(30), request_id="A")
    engine.add_request(40, SamplingParams(30), request_id="B")
    controller = VLLMv1()
    loop = _loop(engine, controller)
    preempted_at = []
    while engine.has_unfinished():
        record = loop.step()
        if record.plan.preempt:
            preempted_at.append(record)
    assert preempted_at and all(list(r.plan.preempt) == ["B"] and not r.plan.admit for r in preempted_at)
    first = preempted_at[0].schedule
    assert {v.request_id: v.status for v in first.requests} == {"A": "running", "B": "running"}
    assert engine.kv_stats()["kv_recomputes"] == controller.preemptions == len(preempted_at)
    assert {rid: len(r.output_ids) for rid, r in loop.results.items()} == {"A": 30, "B": 30}
    swap = VLLMv1(offload=True)
    engine = ReplayEngine(tiny_step_time(), seed=0, kv_tokens=128, offload=HostOffload(1000, 131072))
    engine.add_request(60, SamplingParams(30), request_id="A")
    engine.add_request(40, SamplingParams(30), request_id="B")
    results = _loop(engine, swap).run()
    stats = engine.kv_stats()
    assert stats["kv_offloads"] == stats["kv_restores"] == swap.preemptions > 0 and stats["kv_recomputes"] == 0
    assert {rid: len(r.output_ids) for rid, r in results.items()} == {"A": 30, "B": 30}


def test_vllm_v1_priority_policy_preempts_and_admits_by_priority_then_arrival():
    """vLLM's priority policy (`SLO.priority`, lower first): where the pool runs out, the
    victim is the running request of the largest (priority, arrival), though admitted first and
    already scheduled this step; and the waiting queue goes in that order, so a small
    high-priority request is admitted where FCFS's head of the line blocks it."""
    from adactl.controllers import VLLMv1
    from adactl.runtime import SLO

    def grow(controller):
        engine = ReplayEngine(tiny_step_time(), seed=0, kv_tokens=128)
        engine.add_request(60, SamplingParams(30), request_id="A", arrival_time=0.0, slo=SLO(priority=1))
        engine.add_request(40, SamplingParams(30), request_id="B", arrival_time=0.001, slo=SLO(priority=0))
        loop = _loop(engine, controller)
        while engine.has_unfinished():
            record = loop.step()
            if record.plan.preempt:
                # the victim's token and blocks came back: the other one runs, the whole budget less one
                assert len(record.plan.run) == 1 and record.plan.prefill_budget == controller.max_num_batched_tokens - 1
                assert {rid: len(r.output_ids) for rid, r in loop.run().items()} == {"A": 30, "B": 30}
                return list(record.plan.preempt)
        raise AssertionError("the pool never ran out")

    assert grow(VLLMv1()) == ["B"]  # FCFS: the last admitted
    assert grow(VLLMv1(priority=True)) == ["A"]  # the largest priority value, though admitted first

    def first_admitted(controller):
        engine = ReplayEngine(tiny_step_time(), seed=0, kv_tokens=160)
        engine.add_request(100, SamplingParams(8), request_id="X", arrival_time=0.0)
        loop = _loop(engine, controller)
        loop.step()  # X takes 7 of the 10 blocks
        engine.add_request(60, SamplingParams(8), request_id="C", arrival_time=0.01, slo=SLO(priority=1))
        engine.add_request(10, SamplingParams(8), request_id="D", arrival_time=0.02, slo=SLO(priority=0))
        return list(loop.step().plan.admit)

    assert first_admitted(VLLMv1()) == []  # C heads the line and does not fit: D waits behind it
    assert first_admitted(VLLMv1(priority=True)) == ["D"]
    assert "priority" in VLLMv1(priority=True).name
    with pytest.raises(RequestError, match="priority must be an integer"):
        ReplayEngine(tiny_step_time(), seed=0).add_request(10, SamplingParams(4), slo=SLO(priority=0.5))


def test_vllm_v1_counts_the_blocks_each_request_holds_so_the_replay_never_preempts_for_it():
    """With the blocks each request holds (`RequestView.kv_blocks`), vllm-v1 preempts exactly
    where the pool runs out: the replay's own last-admitted rule (which would swap, as host
    memory is there) never fires. Prompts of whole blocks are where a count from the context
    alone was one block short."""
    from adactl.controllers import VLLMv1

    engine = ReplayEngine(tiny_step_time(), seed=0, kv_tokens=256, offload=HostOffload(10_000, 131072))
    for i, n in enumerate((64, 48, 32, 64)):
        engine.add_request(n, SamplingParams(40), request_id=f"r{i}")
    controller = VLLMv1()
    results = _loop(engine, controller).run()
    stats = engine.kv_stats()
    assert stats["kv_offloads"] == 0 and stats["kv_recomputes"] == controller.preemptions > 0
    assert sorted(len(r.output_ids) for r in results.values()) == [40] * 4


def test_an_idle_server_waits_for_its_restores_and_restores_respect_the_batch_size():
    """With nothing running and a restore in flight, a step that costs nothing (the GPU
    physics prices an empty step at 0) must still move the clock to the copy's end, or the
    server would step forever (found by review); and restores count against max_batch_size."""
    from adactl.estimators import gpu_cost

    physics = gpu_cost.shipped_gpu_profile("h100-llama-3.1-8b")
    slow = HostOffload(1000, 131072, bytes_per_s=1e6)  # a slow link: seconds a copy
    engine = ReplayEngine(physics, seed=0, kv_tokens=640, max_batch_size=2, offload=slow)
    for rid in "AB":
        engine.add_request(64, SamplingParams(8), request_id=rid)
    engine.step(StepPlan(prefill_budget=512))
    engine.step(StepPlan(prefill_budget=0, offload=["B"]))
    while "A" in {v.request_id for v in engine.requests()}:
        engine.step(StepPlan(prefill_budget=0, admit=[]))
    engine.add_request(16, SamplingParams(4), request_id="C")
    engine.step(StepPlan(prefill_budget=512, admit=["C"]))
    engine.add_request(16, SamplingParams(4), request_id="D")
    engine.step(StepPlan(prefill_budget=512, admit=["D"]))  # two running: the batch is full
    with pytest.raises(RequestError, match="past max_batch_size"):
        engine.step(StepPlan(restore=["B"]))
    while {v.request_id for v in engine.requests()} != {"B"}:
        engine.step(StepPlan(prefill_budget=0, admit=[]))
    engine.step(StepPlan(prefill_budget=0, admit=[], restore=["B"]))
    for _ in range(200):
        if not engine.has_unfinished():
            break
        engine.step(StepPlan(prefill_budget=0, admit=[]))
    assert not engine.has_unfinished() and engine.clock() > 8.0  # it waited out the copy (66 tokens at 0.13 s)
    assert sorted(len(r.output_ids) for r in engine.pop_finished()) == [4, 4, 8, 8]


def test_vllm_v1_makes_room_for_chunked_prefills_itself():
    """With a small token budget prompts prefill in chunks while others decode; each chunk's
    blocks are found by the controller (preempting requests admitted after the prompt), so the
    replay never has to preempt on its own (found by review)."""
    from adactl.controllers import VLLMv1

    engine = ReplayEngine(tiny_step_time(), seed=0, kv_tokens=320, offload=HostOffload(10_000, 131072))
    work = [(90, 60), (90, 30), (150, 60), (24, 10), (150, 30), (200, 60)]  # (prompt, output)
    for i, (n, out) in enumerate(work):
        engine.add_request(n, SamplingParams(out), request_id=f"r{i}")
    controller = VLLMv1(max_num_batched_tokens=32)
    results = _loop(engine, controller).run()
    stats = engine.kv_stats()
    assert stats["kv_offloads"] == 0 and stats["kv_recomputes"] == controller.preemptions > 0
    assert sorted(len(results[f"r{i}"].output_ids) for i in range(6)) == sorted(out for _, out in work)


@pytest.mark.parametrize("seed", range(4))
def test_engine_pool_serves_everything_when_preempted_requests_queue_beside_part_prefilled_prompts(target, seed):
    """A request the pool preempts waits behind prompts already part-way through prefill (they
    hold blocks): in front of them it could wait for blocks they never give back. Arrivals
    keep coming while a 10-block pool preempts; every request finishes with its greedy output."""
    import random

    from tests.helpers import make_engine

    rng = random.Random(seed)
    ps = [[rng.randrange(1, 128) for _ in range(rng.randint(30, 70))] for _ in range(8)]
    lens = [rng.randint(20, 150 - len(p)) for p in ps]
    engine = make_engine(target, None, kv_tokens=160)
    ids, pending, steps = [], list(zip(ps, lens)), 0
    while pending or engine.has_unfinished():
        if pending and rng.random() < 0.3:
            p, n = pending.pop(0)
            ids.append(engine.add_request(p, SamplingParams(n)))
        engine.step(StepPlan(prefill_budget=16))
        steps += 1
        assert steps < 3000, f"stuck: {[(v.request_id, v.status, v.prefilled, v.kv_blocks) for v in engine.requests()]}"
    done = {r.request_id: r.output_ids for r in engine.pop_finished()}
    assert [done[i] for i in ids] == [greedy_reference(target, p, n) for p, n in zip(ps, lens)]
    assert engine.kv_stats()["kv_recomputes"] > 0 and engine.kv_stats()["kv_used"] == 0
