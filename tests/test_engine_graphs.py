"""Static-shape forwards (the shapes CUDA graphs replay), run eagerly on the CPU: padded to
their bucket, writing at tensor column indices and attending over the whole cache capacity,
they must decode exactly what `generate` does, for chains, trees and feature drafts."""

from __future__ import annotations

import pytest
import torch

from adactl.runtime import Engine, EngineConfig, FeatureDraft, SamplingParams, StepPlan, TreeSpec
from adactl.runtime.graphs import StaticShapes

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
    assert engine.kv_bytes() == 0


@pytest.mark.parametrize("plans", ["random", "trees"])
def test_static_forwards_decode_like_generate(target, draft, plans):
    engine = static_engine(target, draft)
    # 11 prompts: more rows than the largest bucket, so some forwards fall back to eager
    run_and_check(engine, target, prompts(11, seed=21), plans)
    assert engine.rows.draft is not None


def test_static_forwards_with_a_feature_draft(target):
    vocab = sorted(torch.randperm(128, generator=torch.Generator().manual_seed(0))[:64].tolist())
    draft = FeatureDraft.from_target(target, vocab, intermediate_size=64, seed=3).eval()
    engine = static_engine(target, draft)
    run_and_check(engine, target, prompts(6, seed=22), "random")


def test_graphs_default_off_on_the_cpu(target, draft):
    engine = Engine(target, draft)
    assert engine.graphs is None and engine.rows.target.static is None
    engine = Engine(target, draft, config=EngineConfig(graphs=True))
    assert engine.graphs is None and engine.rows.target.static is not None  # static, eager
