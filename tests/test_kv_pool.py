"""KV memory as blocks (adactl.runtime.kv_pool) and the replay bounded by it: the batch is
capped by memory, prompts wait for blocks, growth preempts by recompute, nothing is lost."""

from __future__ import annotations

import pytest

from adactl.estimators import gpu_cost
from adactl.estimators.step_time import tiny_step_time
from adactl.runtime import SamplingParams, StepPlan
from adactl.runtime.kv_pool import HostOffload, KVPool, kv_tokens_for
from adactl.runtime.replay import ReplayEngine
from adactl.runtime.types import RequestError


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
