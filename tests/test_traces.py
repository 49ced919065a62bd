"""Per-request acceptance traces (adactl.runtime.traces, adactl.traces): recorded from the real
engine on tiny models, chains and token trees, replayed exactly for greedy rows, their files
checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adactl.controllers import oracle
from adactl.estimators.step_time import tiny_step_time
from adactl.interface import VerifyState
from adactl.runtime import Engine, EngineConfig, RequestError, SamplingParams, StepPlan, TreeSpec
from adactl.runtime.models import LoadedModel, ModelPair
from adactl.runtime.replay import ReplayEngine
from adactl.runtime.traces import SIGNALS, AcceptanceTraces, RequestTrace, TraceError
from adactl.traces import record_traces

TOKENS = 20


@pytest.fixture(scope="module")
def pair(target, draft) -> ModelPair:
    specs = {"target": "tiny", "draft": "tiny-perturbed", "companion": "none"}
    return ModelPair(LoadedModel(target, None, "tiny"), draft, None, torch.device("cpu"), torch.float32, specs)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (int(n),), generator=g).tolist() for n in torch.randint(4, 24, (6,))]


@pytest.fixture(scope="module")
def greedy(pair, prompts) -> AcceptanceTraces:
    return record_traces(pair, prompts, 0.0, k=4, max_new_tokens=TOKENS, batch=3, workload="tiny", progress=False)


@pytest.fixture(scope="module")
def sampled(pair, prompts) -> AcceptanceTraces:
    return record_traces(pair, prompts, 0.7, k=4, max_new_tokens=TOKENS, batch=3, workload="tiny", progress=False)


@pytest.fixture(scope="module")
def greedy_trees(pair, prompts, greedy) -> AcceptanceTraces:
    trees = record_traces(pair, prompts, 0.0, k=4, max_new_tokens=TOKENS, batch=3, workload="tiny", progress=False,
                          tree_width=2)  # fmt: skip
    return greedy.with_trees(trees)


@pytest.fixture(scope="module")
def wide_trees(pair, prompts, greedy) -> AcceptanceTraces:
    trees = record_traces(pair, prompts, 0.0, k=4, max_new_tokens=TOKENS, batch=3, workload="tiny", progress=False,
                          tree_width=4)  # fmt: skip
    return greedy.with_trees(trees)


def _tree_steps(engine, prompts, spec, traces=None, temperature=0.0, cut=False):
    """Accepted draft tokens per step of each request, drafting `spec` (cut: verify only the
    first half of each row's nodes)."""
    ids = [engine.add_request(p, SamplingParams(TOKENS, temperature=temperature, seed=i),
                              **({"trace": traces[i]} if traces else {})) for i, p in enumerate(prompts)]  # fmt: skip
    seen: dict[str, list[int]] = {r: [] for r in ids}
    while engine.has_unfinished():
        drafts = engine.draft_step(StepPlan(prefill_budget=1000, tree=spec))
        out = engine.verify((drafts.draft_len + 1) // 2 if cut else None)
        for i, r in enumerate(out.request_ids):
            seen[r].append(int(out.accepted[i]))
    return [seen[r] for r in ids]


@pytest.mark.parametrize("spec,cut", [(TreeSpec(2, 2, 4), False), (TreeSpec(4, 2, 8), True), (TreeSpec(3, 2, 3), False),
                                      (TreeSpec(4, 2, 14), False), (TreeSpec(4, 1, 4), False)])  # fmt: skip
def test_greedy_tree_replay_is_exact_for_any_tree_of_its_width(pair, prompts, greedy_trees, spec, cut):
    """One recorded growth (depth 4, width 2, every node) stands for every tree of width 2 up to
    depth 4, any node budget and verified prefix: the replay accepts what the engine accepts,
    step by step (a one-wide tree is a chain, from the chain trace)."""
    engine = Engine(pair.target.model, pair.draft, config=EngineConfig(max_batch_size=len(prompts)))
    real = _tree_steps(engine, prompts, spec, cut=cut)
    replay = ReplayEngine(tiny_step_time(), max_batch_size=len(prompts), traces=greedy_trees)
    assert _tree_steps(replay, prompts, spec, greedy_trees.requests, cut=cut) == real
    assert 0 < sum(map(sum, real)) < sum(map(len, real)) * spec.depth  # both outcomes occur


@pytest.mark.parametrize("spec,cut", [(TreeSpec(3, 4, 12), False), (TreeSpec(4, 4, 30), True),
                                      (TreeSpec(4, 4, 52), False)])  # fmt: skip
def test_greedy_replay_of_wider_trees_is_exact_from_their_own_recording(pair, prompts, wide_trees, spec, cut):
    """Width 4 (the shipped `_trees_w4` files): the recording of width 4 stands for every tree of
    width 4, as width 2's does for width 2, up to every node of the growth (4 + 3 x 16)."""
    engine = Engine(pair.target.model, pair.draft, config=EngineConfig(max_batch_size=len(prompts)))
    real = _tree_steps(engine, prompts, spec, cut=cut)
    replay = ReplayEngine(tiny_step_time(), max_batch_size=len(prompts), traces=wide_trees)
    assert _tree_steps(replay, prompts, spec, wide_trees.requests, cut=cut) == real
    assert 0 < sum(map(sum, real)) < sum(map(len, real)) * spec.depth
    narrow = StepPlan(tree=TreeSpec(2, 2, 4))  # a width-2 tree is not a part of a width-4 growth
    with pytest.raises(RequestError, match="width-4 trees; plan.tree asks for width 2"):
        ReplayEngine(tiny_step_time(), max_batch_size=1, traces=wide_trees).draft_step(narrow)


def test_sampled_tree_replay_accepts_about_as_the_engine_does(pair, prompts, sampled):
    trees = sampled.with_trees(record_traces(pair, prompts, 0.7, k=4, max_new_tokens=TOKENS, batch=3, workload="tiny",
                                             progress=False, tree_width=2))  # fmt: skip
    spec, real, replayed = TreeSpec(4, 2, 8), [], []
    for seed in range(3):
        engine = Engine(pair.target.model, pair.draft, config=EngineConfig(max_batch_size=len(prompts), seed=seed))
        real += [a for r in _tree_steps(engine, prompts, spec, temperature=0.7) for a in r]
        replay = ReplayEngine(tiny_step_time(), max_batch_size=len(prompts), traces=trees, seed=seed)
        replayed += [a for r in _tree_steps(replay, prompts, spec, trees.requests, temperature=0.7) for a in r]
    assert abs(np.mean(real) - np.mean(replayed)) < 0.3, (np.mean(real), np.mean(replayed))  # same rule, other draws


def test_replayed_trees_carry_their_nodes_signals_and_the_oracle_reads_the_path(greedy_trees, prompts):
    engine = ReplayEngine(tiny_step_time(), max_batch_size=6, traces=greedy_trees)
    for p in prompts:
        engine.add_request(p, SamplingParams(TOKENS))
    engine.step(StepPlan(prefill_budget=1000))
    drafts = engine.draft_step(StepPlan(tree=TreeSpec(3, 2, 6)))
    i = 0
    trace = greedy_trees.requests[int(drafts.request_ids[i].split("-")[1])].tree
    ids, parents = trace.tree_draft(1, 3, 6)
    assert torch.equal(drafts.parents[i, : len(ids)], torch.from_numpy(parents))
    assert torch.allclose(drafts.summarized().token_prob[i, : len(ids)], torch.from_numpy(trace.signals[0, ids, 0]))
    alpha = oracle(engine, tiny_step_time()).estimator.estimate(VerifyState(0.0, drafts)).alpha
    path = engine.verdict_path()
    assert torch.equal(alpha.bool(), path)
    out = engine.verify()
    assert torch.equal(out.path, path) and torch.equal(out.accepted, path.sum(1))
    with pytest.raises(RequestError, match="width-2 trees; plan.tree asks for width 3"):
        engine.draft_step(StepPlan(tree=TreeSpec(3, 3, 6)))
    with pytest.raises(RequestError, match="not running"):
        engine.draft_step(StepPlan(tree={"req-99": TreeSpec(2, 2, 4)}))
    engine.step(StepPlan(tree=TreeSpec(2, 2, 4)))  # the refused plan changed nothing


def test_tree_trace_files_round_trip_and_are_checked(tmp_path, greedy_trees):
    meta = {**greedy_trees.meta, "tree": greedy_trees.meta["trees"]}
    trees = AcceptanceTraces([t.tree for t in greedy_trees.requests], meta)
    path = trees.save(tmp_path / "trees.npz")
    loaded = AcceptanceTraces.load(path, draft="tiny-perturbed")
    assert loaded.tree == {"depth": 4, "width": 2} and loaded.max_draft == 4
    for a, b in zip(loaded.requests, trees.requests):
        assert np.array_equal(a.parents, b.parents) and np.allclose(a.ratio, b.ratio) and a.tree_width == 2
    with pytest.raises(TraceError, match="were not recorded on these requests"):
        AcceptanceTraces(greedy_trees.requests[:2], greedy_trees.meta).with_trees(loaded)
    with pytest.raises(TraceError, match="cannot be mixed"):
        AcceptanceTraces.mix([loaded, greedy_trees])
    with pytest.raises(ValueError, match="with_trees"):  # a tree trace alone is not a request's acceptance
        ReplayEngine(tiny_step_time(), traces=loaded)
    with np.load(path) as data:
        parents = data["parents"].copy()
    parents[0, 0] = 3  # a node whose parent comes after it
    _rewrite(path, parents=parents)
    with pytest.raises(TraceError, match="not a best-first node order"):
        AcceptanceTraces.load(path)


def _accepted_by_step(engine, prompts, k, temperature=0.0, traces=None):
    ids = [engine.add_request(p, SamplingParams(TOKENS, temperature=temperature), **({"trace": t} if traces else {}))
           for p, t in zip(prompts, traces or prompts)]  # fmt: skip
    seen: dict[str, list[int]] = {r: [] for r in ids}
    while engine.has_unfinished():
        out = engine.step(StepPlan(draft_len=k, prefill_budget=1000))
        for i, r in enumerate(out.request_ids):
            seen[r].append(int(out.accepted[i]))
    return [seen[r] for r in ids]


def test_recorded_traces_hold_every_position(greedy, sampled, prompts):
    for traces in (greedy, sampled):
        assert len(traces) == len(prompts) and traces.max_draft == 4
        for t, p in zip(traces.requests, prompts):
            assert t.prompt_len == len(p) and t.signals.shape == (t.positions, 4, len(SIGNALS))
            assert t.positions == TOKENS - 1 or t.eos  # one row per decode step
            assert np.isfinite(t.signals).all() and (t.signals[..., 0] > 0).all()  # the draft's own token prob
    ratios = np.concatenate([t.ratio for t in greedy.requests])
    assert set(np.unique(ratios)) <= {0.0, 1.0} and 0 < ratios.mean() < 1  # agreement: both outcomes occur
    soft = np.concatenate([t.ratio for t in sampled.requests])
    assert ((soft > 0) & (soft < 1)).any() and (soft >= 0).all() and (soft <= 1).all()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_replay_is_exact_for_any_draft_length(pair, prompts, greedy, k):
    """Greedy output does not depend on how it was drafted: replaying the traces at draft length
    k accepts exactly what the engine accepts, step by step, request by request."""
    engine = Engine(pair.target.model, pair.draft, config=EngineConfig(max_batch_size=len(prompts)))
    real = _accepted_by_step(engine, prompts, k)
    replay = ReplayEngine(tiny_step_time(), max_batch_size=len(prompts), traces=greedy)
    assert _accepted_by_step(replay, prompts, k, traces=greedy.requests) == real
    assert sum(map(sum, real)) > 0


def test_replayed_drafts_carry_the_recorded_signals_and_the_oracle_reads_the_verdict(greedy, prompts):
    engine = ReplayEngine(tiny_step_time(), max_batch_size=6, traces=greedy)
    for p in prompts:
        engine.add_request(p, SamplingParams(TOKENS))  # each takes the next greedy trace
    engine.step(StepPlan(draft_len=0, prefill_budget=1000))  # prefill: first tokens
    drafts = engine.draft_step(StepPlan(draft_len=3))
    s = drafts.summarized()
    for i in range(len(prompts)):  # rows keep the order requests were added (all draft 3)
        recorded = greedy.requests[int(drafts.request_ids[i].split("-")[1])].signals[0, :3]
        assert torch.allclose(s.token_prob[i], torch.from_numpy(recorded[:, 0]))
        assert torch.allclose(s.entropy[i], torch.from_numpy(recorded[:, 1]))
    verdict = engine.verdict()
    alpha = oracle(engine, tiny_step_time()).estimator.estimate(VerifyState(0.0, drafts)).alpha
    assert torch.equal(alpha.sum(1).long(), verdict)
    out = engine.verify()
    assert torch.equal(out.accepted, verdict)  # the peek is what verifying everything keeps


def test_sampled_replay_accepts_about_as_the_engine_does(pair, prompts, sampled):
    engine = Engine(pair.target.model, pair.draft, config=EngineConfig(max_batch_size=len(prompts)))
    real = _accepted_by_step(engine, prompts, 2, temperature=0.7)
    replay = ReplayEngine(tiny_step_time(), max_batch_size=len(prompts), traces=sampled)
    replayed = _accepted_by_step(replay, prompts, 2, temperature=0.7, traces=sampled.requests)
    mean = [float(np.mean([a for r in runs for a in r])) for runs in (real, replayed)]
    assert abs(mean[0] - mean[1]) < 0.35, mean  # same distribution, other draws


def test_file_round_trip_and_mix(tmp_path, greedy, sampled):
    path = greedy.save(tmp_path / "g.npz")
    loaded = AcceptanceTraces.load(path, draft="tiny-perturbed")
    assert len(loaded) == len(greedy) and loaded.meta["workload"] == "tiny"
    for a, b in zip(loaded.requests, greedy.requests):
        assert a.prompt_len == b.prompt_len and a.greedy and a.eos == b.eos
        assert np.allclose(a.ratio, b.ratio) and np.allclose(a.signals, b.signals, rtol=1e-2, atol=1e-3)
    mixed = AcceptanceTraces.mix([loaded, sampled])
    assert len(mixed) == 2 * len(greedy) and [t.greedy for t in mixed.requests[:2]] == [True, False]
    alpha = greedy.mean_acceptance()
    assert len(alpha) == 4 and all(0 <= a <= 1 for a in alpha)


def _rewrite(path, **changes):
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta.update(changes.pop("meta", {}))
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays.update(changes)
    np.savez(path, **arrays)


def test_bad_trace_files_are_one_clear_error(tmp_path, greedy):
    with pytest.raises(TraceError, match="do not exist"):
        AcceptanceTraces.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(TraceError, match="corrupt or not an adactl trace file"):
        AcceptanceTraces.load(junk)
    path = greedy.save(tmp_path / "t.npz")
    with pytest.raises(TraceError, match="recorded with draft 'tiny-perturbed', not 'draft@0123'"):
        AcceptanceTraces.load(path, draft="draft@0123")
    _rewrite(path, meta={"format": "something-else"})
    with pytest.raises(TraceError, match="not an adactl trace file"):
        AcceptanceTraces.load(path)
    path = greedy.save(tmp_path / "t.npz")
    with np.load(path) as data:
        ratio = data["ratio"].copy()
    ratio[0, 0] = 1.5
    _rewrite(path, ratio=ratio)
    with pytest.raises(TraceError, match=r"outside \[0, 1\]"):
        AcceptanceTraces.load(path)
    path = greedy.save(tmp_path / "t.npz")
    _rewrite(path, positions=np.array([1, 2], dtype=np.int32))
    with pytest.raises(TraceError, match="shapes do not match"):
        AcceptanceTraces.load(path)


def test_replay_ends_requests_where_their_trace_ended_by_eos():
    trace = RequestTrace(5, True, np.ones((3, 2), np.float32), np.full((3, 2, len(SIGNALS)), 0.5, np.float32), eos=True)
    engine = ReplayEngine(tiny_step_time(), traces=AcceptanceTraces([trace]))
    rid = engine.add_request(5, SamplingParams(50))
    while engine.has_unfinished():
        engine.step(StepPlan(draft_len=2, prefill_budget=100))
    (result,) = engine.pop_finished()
    assert result.request_id == rid and result.finish_reason == "eos" and len(result.output_ids) == 4


def test_the_mixed_workload_takes_a_chat_and_a_code_request_in_turn(tmp_path):
    """`--workload mixed`: the shipped chat and code traces interleaved, so any batch holds both,
    and the speculation bench replays it, greedy and sampled requests in one batch (here with a
    loaded server's refills: `--saturated`)."""
    from adactl.cli import main
    from adactl.runtime.traces import shipped_traces, shipped_traces_path

    mixed = shipped_traces("mixed")
    chat = AcceptanceTraces.load(shipped_traces_path("sharegpt", 0.0))
    code = AcceptanceTraces.load(shipped_traces_path("humaneval", 0.0))
    greedy = [t for t in mixed.requests if t.greedy]
    assert len(greedy) == len(chat) + len(code)
    assert greedy[0].prompt_len == chat.requests[0].prompt_len and greedy[1].prompt_len == code.requests[0].prompt_len
    assert np.array_equal(greedy[3].ratio, code.requests[1].ratio)
    assert "sharegpt" in mixed.meta["workload"] and "humaneval" in mixed.meta["workload"]
    args = ["--replay", "--profile", "h100-llama-3.1-8b", "--workload", "mixed", "--batches", "4", "--temperatures",
            "0,0.7", "--controllers", "no-spec;fixed-k2;goodput-req", "--max-new-tokens", "8", "--saturated", "2",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(["bench", "spec", *args]) == 0
    data = json.loads((tmp_path / "spec_mixed_replay.json").read_text())
    assert "sharegpt" in data["meta"]["replay"]["acceptance"] and "humaneval" in data["meta"]["replay"]["acceptance"]
    records = data["records"]
    assert {r["controller"] for r in records} == {"no-spec", "fixed-k2", "goodput-req", "oracle", "request-oracle",
                                                 "lookahead-oracle"}  # fmt: skip
    assert {r["temperature"] for r in records} == {"mixed"}  # greedy and sampled requests in one batch
    assert all(r["tokens"] == 8 * 8 and not r["fallbacks"] for r in records)  # 8 requests, 4 at a time
