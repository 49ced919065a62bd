"""Static-shape forwards (the shapes CUDA graphs replay), on the CPU: padded to their bucket,
writing at tensor column indices and attending over the whole cache capacity, they must
decode exactly what `generate` does, for chains, trees and feature drafts. The graphs'
bookkeeping runs here too, with the CPU's stand-in for a graph (a "replay" runs the captured
forward again into the captured outputs): captures across drains, growth, aborts and a
capture that fails."""

from __future__ import annotations

import weakref

import pytest
import torch

from adactl.runtime import Engine, EngineConfig, FeatureDraft, SamplingParams, StepPlan, TreeSpec
from adactl.runtime.graphs import CudaGraphs, StaticShapes, record
from adactl.runtime.kv import BatchKV, Features

from .helpers import greedy_reference, prompts, random_plan_runner


def test_buckets():
    shapes = StaticShapes(rows=(1, 2, 4, 8), tokens=(1, 2, 4))
    assert shapes.bucket(1, 1) == (1, 1)
    assert shapes.bucket(3, 3) == (4, 4)
    assert shapes.bucket(8, 4) == (8, 4)
    assert shapes.bucket(9, 1) is None and shapes.bucket(2, 5) is None  # eager
    assert shapes.scratch == 4


def static_engine(target, draft, **config) -> Engine:
    # small buckets and column blocks, so that tests cross bucket edges and grow the cache
    shapes = StaticShapes(rows=(1, 2, 4, 8), tokens=(1, 2, 3, 4, 5, 6), col_block=32)
    return Engine(target, draft, config=EngineConfig(graphs=True, shapes=shapes, **config))


def run_and_check(engine: Engine, target, ps, plans: str, max_new: int = 24) -> None:
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=max_new)) for p in ps]
    if plans == "random":
        random_plan_runner(engine, seed=7, max_k=5)
    else:
        trees = TreeSpec(depth=3, width=2, nodes=5)
        while engine.has_unfinished():
            running = [v.request_id for v in engine.requests() if v.status == "running"]
            tree = {r: trees for i, r in enumerate(running) if i % 2 == 0}
            engine.step(StepPlan(draft_len=3, tree=tree, prefill_budget=64))
    out = {r.request_id: r.output_ids for r in engine.pop_finished()}
    for rid, p in zip(ids, ps):
        assert out[rid] == greedy_reference(target, p, max_new)[: len(out[rid])]
        assert len(out[rid]) == max_new or out[rid][-1] in engine.eos_ids
    assert engine.rows.target.static_forwards > 0  # the static path ran
    assert engine.graph_stats()["captures"] > 0
    assert engine.kv_bytes() > 0  # drained, its memory kept for the graphs to replay into
    engine.close()
    assert engine.kv_bytes() == 0 and engine.graph_stats()["graphs"] == 0


@pytest.mark.parametrize("plans", ["random", "trees"])
def test_static_forwards_decode_like_generate(target, draft, plans):
    engine = static_engine(target, draft)
    # 11 prompts: more rows than the largest bucket, so some forwards fall back to eager
    run_and_check(engine, target, prompts(11, seed=21), plans)
    assert engine.rows.draft is not None


@pytest.mark.parametrize("layers", [None, [1, 2]], ids=["last", "fused"])
def test_static_forwards_with_a_feature_draft(target, layers):
    """Decoding as `generate` does with a feature draft (the last hidden state, or two fused);
    the target's graphs keep only the draft's features as outputs, never a hidden state per
    layer."""
    vocab = sorted(torch.randperm(128, generator=torch.Generator().manual_seed(0))[:64].tolist())
    draft = FeatureDraft.from_target(target, vocab, intermediate_size=64, seed=3, feature_layers=layers).eval()
    engine = static_engine(target, draft)
    for p in prompts(3, seed=23):
        engine.add_request(p, SamplingParams(max_new_tokens=6))
    while engine.has_unfinished():
        engine.step(StepPlan(draft_len=2, prefill_budget=64))
    engine.pop_finished()
    owners = {engine.rows.target.owner, engine.rows.prefill_target.owner}
    outputs = [g.output for key, g in engine.graphs.graphs.items() if key[0] in owners]
    assert outputs and all(isinstance(o, Features) for o in outputs)
    assert all(o.features.shape[-1] == target.config.hidden_size for o in outputs)
    run_and_check(engine, target, prompts(6, seed=22), "random")


def test_graphs_default_off_on_the_cpu(target, draft):
    engine = Engine(target, draft)
    assert engine.graphs is None and engine.rows.target.static is None
    engine = Engine(target, draft, config=EngineConfig(graphs=True))  # static, the graphs' stand-in
    assert engine.graphs is not None and engine.rows.target.static is not None
    engine = Engine(target, draft, config=EngineConfig(graphs=False))
    assert engine.kv_bytes() == 0
    run_to_end(engine, prompts(3, seed=30), max_new=8)
    assert engine.kv_bytes() == 0  # without graphs a drain gives the memory back


def run_to_end(engine: Engine, ps, max_new: int = 16, k: int = 3) -> dict[str, list[int]]:
    """The same plans every call: chains of `k` on every row, prefill 64 tokens a step."""
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=max_new)) for p in ps]
    while engine.has_unfinished():
        engine.step(StepPlan(draft_len=k, prefill_budget=64))
    out = {r.request_id: r.output_ids for r in engine.pop_finished()}
    return {rid: out[rid] for rid in ids}


def test_graphs_outlive_a_drain_no_capture_after_warm_up(target, draft):
    engine = static_engine(target, draft)
    ps = prompts(5, seed=31)
    want = [greedy_reference(target, p, 16) for p in ps]
    captures = []
    for _ in range(5):  # each burst after an idle moment: the same shapes as the last
        assert list(run_to_end(engine, ps).values()) == want
        captures.append(engine.graph_stats()["captures"])
    # the first burst captures; the caches keep their memory and identity over the drain,
    # so every later burst replays only
    assert captures == [captures[0]] * 5 and captures[0] > 0, captures
    assert engine.graph_stats()["capture_failures"] == 0


def growing_batch(engine: Engine, target) -> None:
    """Requests joining one, then two, then four at a time while the others run (the batch
    and the contexts grow), decoded as `generate` does."""
    ps, ids = prompts(7, seed=60), []
    for wave in (ps[:1], ps[1:3], ps[3:7]):
        ids += [engine.add_request(p, SamplingParams(max_new_tokens=12)) for p in wave]
        for _ in range(3):
            engine.step(StepPlan(draft_len=2, prefill_budget=64))
    while engine.has_unfinished():
        engine.step(StepPlan(draft_len=2, prefill_budget=64))
    out = {r.request_id: r.output_ids for r in engine.pop_finished()}
    assert [out[i] for i in ids] == [greedy_reference(target, p, 12) for p in ps]


def test_a_reservation_keeps_graphs_over_a_growing_batch_and_aborts(target, draft):
    """`Engine.reserve(rows, columns)`: the batch caches are allocated once at that size, so a
    growing batch drops no graph for a growth (without it, each growth drops the cache's
    graphs and the next step of each shape captures again); the reservation outlives a drain
    and `abort_all`, `close` gives it up; bad sizes are refused before anything changes."""
    counts = {}
    for reserved in (False, True):
        engine = static_engine(target, draft)
        if reserved:
            engine.reserve(8, 96)
            assert engine.rows.target.capacity == (8, 128)  # 96 columns and 6 of scratch, in blocks of 32
            assert engine.rows.draft is not None and engine.rows.draft.capacity == (8, 128)
        growing_batch(engine, target)
        first = engine.graph_stats()["captures"]
        growing_batch(engine, target)  # the same again: every shape captured already
        counts[reserved] = (first, engine.graph_stats()["captures"])
        if reserved:
            assert engine.rows.target.capacity == (8, 128)  # never grew, never shrank
            engine.abort_all()
            assert engine.rows.target.capacity == (8, 128)
            engine.close()
            assert engine.kv_bytes() == 0 and engine.rows.target.capacity == (0, 0)
    assert counts[True][0] < counts[False][0], counts
    assert counts[True][1] == counts[True][0], counts  # a second pass replays only
    engine = static_engine(target, draft, max_batch_size=8)
    for bad in ((0, 10), (9, 10), (2, 0), (2.5, 10)):
        with pytest.raises(ValueError, match="reserve"):
            engine.reserve(*bad)  # type: ignore[arg-type]
    assert engine.rows.target.capacity == (0, 0)


def test_aborts_keep_graphs_and_memory_level_and_eager_aborts_free_everything(target, draft):
    """`abort_all` (a server's answer to a step that raised) empties the caches: with graphs
    their buffers and graphs stay, so after the first abort memory and graphs stay level over
    100 aborts, the steps after each replay without capturing again, and no cache is ever
    replaced (nothing old to leak); without graphs every byte goes back. The engine serves as
    before either way, and `close` frees everything."""
    for graphs in (True, False):
        engine = static_engine(target, draft) if graphs else Engine(target, draft)
        caches = [weakref.ref(kv) for kv in engine.rows.caches()]
        levels, captures = set(), []
        for i in range(100):
            for p in prompts(3, seed=40 + i % 3):
                engine.add_request(p, SamplingParams(max_new_tokens=8))
            for _ in range(3):
                engine.step(StepPlan(draft_len=2, prefill_budget=64))
            assert engine.kv_bytes() > 0
            engine.abort_all()
            assert not engine.has_unfinished()
            levels.add((engine.kv_bytes(), engine.graph_stats()["graphs"]))
            captures.append(engine.graph_stats()["captures"])
        if graphs:
            assert len(levels) == 1 and min(levels)[0] > 0 and min(levels)[1] > 0, levels  # level, not growing
            assert captures[3:] == [captures[2]] * 97, captures  # the three prompt sets captured, then replays
            assert [r() for r in caches] == engine.rows.caches()  # the same caches all along
        else:
            assert levels == {(0, 0)}
        ps = prompts(2, seed=50)
        assert list(run_to_end(engine, ps, max_new=8).values()) == [greedy_reference(target, p, 8) for p in ps]
        engine.close()
        assert (engine.kv_bytes(), engine.graph_stats()["graphs"]) == (0, 0)


def test_a_thousand_steps_of_joins_drains_and_aborts_capture_each_shape_once(target, draft):
    """With the batch reserved, a server-like run (requests joining at random, the batch
    draining now and then, an abort every ~200 steps, chains of 0-4 and trees) captures each
    shape the first time it runs and never again: every graph ever captured is still held (none
    dropped for a growth, a drain or an abort and captured again), and the first 300 steps
    capture most of them. (A bucket first reached late, the batch's first 8 rows, is captured
    then: capture is lazy, not at start-up.)"""
    import random

    rng = random.Random(3)
    engine = static_engine(target, draft)
    engine.reserve(8, 192)
    bank = prompts(16, seed=70)
    captures = []
    for step in range(1000):
        if rng.random() < 0.3 and len(engine.requests()) < 8:
            engine.add_request(rng.choice(bank), SamplingParams(max_new_tokens=rng.randint(4, 24)))
        if step % 211 == 210:
            engine.abort_all()
        elif engine.has_unfinished():
            k = rng.choice([0, 1, 2, 3, 4])
            tree = TreeSpec(depth=2, width=2, nodes=4) if rng.random() < 0.2 else None
            engine.step(StepPlan(draft_len=k, tree=tree, prefill_budget=64))
        engine.pop_finished()
        captures.append(engine.graph_stats()["captures"])
    stats = engine.graph_stats()
    assert engine.rows.target.capacity == (8, 224)  # 192 and 6 of scratch, in blocks of 32: never grew
    assert stats["captures"] == stats["graphs"] > 0, stats  # each captured once, all still held
    assert captures[300] >= 0.7 * captures[-1], (captures[300], captures[-1])
    assert stats["capture_failures"] == 0


def test_warm_up_captures_the_decode_and_verify_graphs_before_the_first_request(target, draft):
    """`Engine.warm_up` after `reserve`: every row bucket up to the reservation, largest first,
    plain decoding and k = 2, captured on dummy requests that leave nothing behind; a batch
    served afterwards at those shapes captures nothing in the batch caches and decodes as
    `generate` does. Bad calls are refused before anything runs."""
    engine = static_engine(target, draft)
    with pytest.raises(ValueError, match="reservation"):
        engine.warm_up()
    engine.reserve(8, 64)
    for bad in ({"rows": [16]}, {"rows": [0]}, {"draft_lens": [7]}, {"draft_lens": [-1]}):
        with pytest.raises(ValueError, match="warm_up"):
            engine.warm_up(**bad)
    captured = engine.warm_up(draft_lens=(0, 2))
    assert captured > 0 and captured == engine.graph_stats()["captures"]
    assert not engine.has_unfinished() and engine.pop_finished() == []
    batch = (engine.rows.target.owner, engine.rows.draft.owner)

    def batch_graphs() -> int:
        return sum(1 for key in engine.graphs.graphs if key[0] in batch)

    held = batch_graphs()
    assert held > 0
    ps = prompts(5, seed=80)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=10)) for p in ps]
    while any(v.status != "running" for v in engine.requests()):
        engine.step(StepPlan(draft_len=0, prefill_budget=64))
    while engine.has_unfinished():
        engine.step(StepPlan(draft_len=2, prefill_budget=0))
        assert batch_graphs() == held  # decode and verify of 1-5 rows: buckets 1, 2, 4, 8, all warm
    out = {r.request_id: r.output_ids for r in engine.pop_finished()}
    assert [out[i] for i in ids] == [greedy_reference(target, p, 10) for p in ps]
    with pytest.raises(RuntimeError, match="idle"):
        engine.add_request(ps[0], SamplingParams(max_new_tokens=4))
        engine.warm_up()
    assert Engine(target, draft).warm_up() == 0  # no graphs: nothing to capture
    small = static_engine(target, draft, kv_tokens=64)  # room for 2 of the 8 dummy requests
    small.reserve(8, 64)
    with pytest.raises(RuntimeError, match="KV pool"):
        small.warm_up()
    assert not small.has_unfinished()  # the dummies are gone either way


def test_a_forward_that_cannot_be_captured_runs_eagerly(target, draft):
    engine = static_engine(target, draft)
    assert engine.graphs is not None
    tried: list[int] = []

    def capture(fn, inputs):  # verify forwards (several tokens a row) sync on the device, say
        if inputs["ids"].shape[1] > 1:
            tried.append(inputs["ids"].shape[1])
            raise RuntimeError("operation not permitted when stream is capturing")
        return record(fn, inputs)

    engine.graphs.capture = capture
    ps = prompts(4, seed=32)
    want = [greedy_reference(target, p, 16) for p in ps]
    with pytest.warns(RuntimeWarning, match="could not be captured") as warned:
        assert list(run_to_end(engine, ps).values()) == want
    assert len([w for w in warned if "could not be captured" in str(w.message)]) == 1  # said once
    failures = engine.graph_stats()["capture_failures"]
    assert failures == len(tried) > 0 and engine.graph_stats()["captures"] > 0  # decode steps still captured
    assert list(run_to_end(engine, ps).values()) == want
    assert engine.graph_stats()["capture_failures"] == failures  # eager for good: never tried again


def test_a_graph_output_survives_the_next_replay(target):
    kv = BatchKV(2, static=StaticShapes(rows=(2,), tokens=(1,), col_block=32), graphs=CudaGraphs("cpu"))
    kv.new_rows(2)
    one = torch.ones(2, 1, dtype=torch.bool)
    first = kv.forward(target, torch.tensor([[5], [7]]), one).logits
    kept = first.clone()
    second = kv.forward(target, torch.tensor([[9], [11]]), one).logits  # the same graph, replayed
    assert kv.graphs is not None and kv.graphs.captures == 1
    assert torch.equal(first, kept) and not torch.equal(first, second)


def test_a_replayed_feature_draft_forward_returns_its_own_outputs(target):
    vocab = sorted(torch.randperm(128, generator=torch.Generator().manual_seed(0))[:64].tolist())
    draft = FeatureDraft.from_target(target, vocab, intermediate_size=64, seed=3).eval()
    layers = int(draft.get_text_config().num_hidden_layers)
    shapes = StaticShapes(rows=(2,), tokens=(1,), col_block=32)
    graphed, eager = BatchKV(layers, static=shapes, graphs=CudaGraphs("cpu")), BatchKV(layers, static=shapes)
    gen = torch.Generator().manual_seed(4)
    for kv in (graphed, eager):
        kv.new_rows(2)
    with torch.inference_mode():
        for _ in range(3):  # the first captures, the others replay
            ids = torch.randint(128, (2, 1), generator=gen)
            feats = torch.randn(2, 1, draft.hidden_size, generator=gen)
            one = torch.ones(2, 1, dtype=torch.bool)
            a, b = (kv.forward(draft, ids, one, features=feats) for kv in (graphed, eager))
            assert torch.allclose(a.logits, b.logits) and torch.allclose(a.hidden_states, b.hidden_states)
    assert graphed.graphs is not None and graphed.graphs.captures == 1


def test_cache_owners_are_never_reused():
    owners = set()
    for _ in range(1000):
        kv = BatchKV(1)
        assert kv.owner not in owners
        owners.add(kv.owner)
        del kv  # id() of the next one is often this one's
