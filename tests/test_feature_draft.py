"""The EAGLE-style feature draft in the engine: lossless with any plan, acceptance that matches
the target features it reads checked token by token, real distillation steps, and save/load."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

from adactl.runtime import BatchKV, FeatureDraft, SamplingParams, StepPlan, load_draft
from adactl.runtime.models import LoadedModel, tiny_llama

from .helpers import make_engine, prompts, random_plan_runner

REPO = Path(__file__).resolve().parent.parent


def distill_module():
    spec = importlib.util.spec_from_file_location("distill_draft", REPO / "train" / "distill_draft.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["distill_draft"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def reduced_vocab(vocab: int = 128, keep: int = 96, seed: int = 0) -> list[int]:
    """A reduced draft vocabulary that keeps EOS (token 0)."""
    return sorted({0, *random.Random(seed).sample(range(1, vocab), keep - 1)})


@pytest.fixture(
    scope="module",
    params=[(None, False), ([0, 1, 2], False), ([0, 1, 2], True)],
    ids=["last-feature", "fused-features", "fused-normed"],
)
def random_feature_draft(target, request) -> FeatureDraft:
    """EAGLE-1's single feature (the target's last hidden state) and EAGLE-3's fused features
    (here: the embeddings and both layers of the 2-layer target), also with EAGLE-3's input
    norms (`input_norm`)."""
    layers, norm = request.param
    return FeatureDraft.from_target(target, reduced_vocab(), intermediate_size=64, seed=3,
                                    feature_layers=layers, input_norm=norm).eval()  # fmt: skip


@pytest.mark.parametrize("batch,seed", [(1, 0), (5, 1), (7, 2)])
def test_random_plans_match_generate(target, random_feature_draft, batch, seed):
    ps = prompts(batch, seed=seed)
    engine = make_engine(target, random_feature_draft)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=24)) for p in ps]
    random_plan_runner(engine, seed=seed, budget=5)  # chunked prefill: features carried across chunks
    done = {r.request_id: r.output_ids for r in engine.pop_finished()}
    for rid, p in zip(ids, ps):
        ref = target.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p) :].tolist()
        assert done[rid] == ref


@pytest.mark.parametrize("batch,seed", [(1, 0), (3, 1)])
def test_draft_reads_the_right_target_features(target, random_feature_draft, batch, seed, monkeypatch):
    """Every token the draft reads from the target side (prefill chunks, catch-up after
    verification) is paired with the target's true feature of the previous position, and
    every drafted token with the draft's own feature from the forward before."""
    calls: list[dict] = []
    step = [0]
    original = BatchKV.forward

    def recording(self, model, input_ids, new_valid, *a, **kw):
        first = kw.get("first_row", 0)
        before = self.row_lengths()[first : first + input_ids.shape[0]].clone()
        out = original(self, model, input_ids, new_valid, *a, **kw)
        if new_valid is None:  # (every slot real)
            new_valid = torch.ones(input_ids.shape, dtype=torch.bool)
        if "features" in kw:
            positions = before[:, None] + new_valid.long().cumsum(1) - 1
            calls.append(
                dict(
                    step=step[0],
                    ids=input_ids.clone(),
                    valid=new_valid.clone(),
                    pos=positions,
                    feats=kw["features"].clone(),
                    hidden=out.hidden_states.clone(),
                )
            )
        return out

    monkeypatch.setattr(BatchKV, "forward", recording)
    engine = make_engine(target, random_feature_draft)
    ps = prompts(batch, seed=seed, max_len=9)
    for p in ps:
        engine.add_request(p, SamplingParams(max_new_tokens=20))
    rng = random.Random(seed)
    while engine.has_unfinished():
        step[0] += 1
        engine.step(StepPlan(draft_len=rng.choice([0, 2, 4]), prefill_budget=4))
    seqs = [r.prompt_ids + r.output_ids for r in engine.pop_finished()]
    with torch.no_grad():
        states = [target(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states for s in seqs]
        true = [random_feature_draft.target_features(h)[0] for h in states]
    checked_true = checked_own = 0
    for i, call in enumerate(calls):
        chain = i > 0 and calls[i - 1]["step"] == call["step"] and call["ids"].shape[1] == 1 and call["step"] > 0
        chain = chain and not bool(call["pos"].eq(0).any())
        for row in range(call["ids"].shape[0]):
            slots = call["valid"][row].nonzero().flatten().tolist()
            pos = [int(call["pos"][row, j]) for j in slots]
            tok = [int(call["ids"][row, j]) for j in slots]
            owners = [k for k, s in enumerate(seqs) if all(p < len(s) and s[p] == t for p, t in zip(pos, tok))]
            if chain and calls[i - 1]["hidden"].shape[0] > row and not owners:
                assert torch.allclose(call["feats"][row, 0], calls[i - 1]["hidden"][row, -1])
                checked_own += 1
                continue
            if chain:
                continue  # a drafted token that the target also produced: either reading is fine
            assert owners, (pos, tok)

            def expected(k: int, p: int) -> torch.Tensor:
                return torch.zeros_like(true[k][0]) if p == 0 else true[k][p - 1]

            # a short row may match several requests' tokens; one of them must give its features
            assert any(
                all(torch.allclose(call["feats"][row, j], expected(k, p), atol=1e-4) for j, p in zip(slots, pos))
                for k in owners
            ), (i, row, pos)
            checked_true += len(slots)
    assert checked_true > 20 and checked_own > 5, (checked_true, checked_own)


@pytest.mark.parametrize("unroll", [1, 2])
def test_distillation_steps_lower_the_loss(target, unroll):
    """Real training steps of train/distill_draft.py on the target's own samples."""
    dd = distill_module()
    data = _teacher(target, dd)
    draft = FeatureDraft.from_target(target, reduced_vocab(), intermediate_size=64, seed=0)
    args = dd.Args(noise=0.05, lr=3e-3, unroll=unroll)
    batch = dd.make_batch(data, list(range(16)))
    first, _ = dd.losses(draft, batch, args)
    _train(dd, draft, data, args)
    last, info = dd.losses(draft, batch, args)
    first, last = float(first.detach()), float(last.detach())
    assert last < 0.8 * first, (first, last, info)
    assert ("ce2" in info) == (unroll == 2)
    assert not any(p.requires_grad for p in target.parameters()) or draft.head_weight.grad is None


def test_save_and_load_round_trip(target, random_feature_draft, tmp_path):
    draft = random_feature_draft
    held = torch.tensor(prompts(2, seed=5, max_len=10)[0] * 10)[None, :10].repeat(2, 1)
    draft.save(tmp_path / "d", dtype=torch.float32)
    loaded = load_draft(str(tmp_path / "d"), LoadedModel(target, None, "tiny"))
    ids = held[:2, :10]
    feats = torch.randn(2, 10, 64)
    with torch.no_grad():
        assert torch.allclose(draft(ids, feats).logits, loaded(ids, feats).logits, atol=1e-5)
    other = tiny_llama(vocab_size=256, seed=1)
    with pytest.raises(ValueError, match="feature draft for a target"):
        load_draft(str(tmp_path / "d"), LoadedModel(other, None, "other"))


def test_plain_draft_spec_still_loads(target, tmp_path):
    target.save_pretrained(tmp_path / "plain")
    draft = load_draft(str(tmp_path / "plain"), LoadedModel(target, None, "tiny"))
    assert not isinstance(draft, FeatureDraft)


def _trace(engine, ps, steps_seed: int) -> list:
    """Greedy steps with random per-row draft lengths; the DraftBatch of every step."""
    rng = random.Random(steps_seed)
    for p in ps:
        engine.add_request(p, SamplingParams(max_new_tokens=16))
    seen = []
    while engine.has_unfinished():
        running = sorted(v.request_id for v in engine.requests() if v.status == "running")
        drafts = engine.draft_step(StepPlan(draft_len={r: rng.randint(0, 4) for r in running}))
        seen.append(drafts)
        engine.verify()
    return seen


def test_companion_runs_on_its_own_cache_without_disturbing_the_draft(target, random_feature_draft, tmp_path):
    """With a companion the draft's tokens and probabilities are unchanged; at the first draft
    position (which depends on the context alone) the companion's distribution equals what it
    gives when it is the draft itself, so it reads its own cache layers, not the draft's. Next
    to a fused-feature draft only a companion trained on that draft's outputs is accepted."""
    from adactl.runtime.feature_draft import WithCompanion

    def companion() -> FeatureDraft:
        return FeatureDraft.from_target(target, reduced_vocab(seed=1), intermediate_size=32, seed=5).eval()

    mate = companion()
    if random_feature_draft.fuse is not None:
        with pytest.raises(ValueError, match="trained on its outputs"):
            WithCompanion(random_feature_draft, mate)
        random_feature_draft.save(tmp_path / "draft")  # gives it the digest a companion names
        mate.config.reads_draft = random_feature_draft.digest
    ps = prompts(3, seed=4)
    paired = _trace(make_engine(target, WithCompanion(random_feature_draft, mate)), ps, 0)
    alone = _trace(make_engine(target, random_feature_draft), ps, 0)
    assert len(paired) == len(alone)
    for p, a in zip(paired, alone):
        assert p.request_ids == a.request_ids and torch.equal(p.tokens, a.tokens)
        torch.testing.assert_close(p.probs, a.probs)
        assert p.companion_probs is not None and a.companion_probs is None
    if random_feature_draft.fuse is not None:  # alone, the companion would read other features
        return
    as_draft = _trace(make_engine(target, companion()), ps, 0)
    # greedy outputs are the target's, so (request, context length) names one context in every run
    own = {
        (rid, int(c.context_len[i])): c.probs[i, 0]
        for c in as_draft
        for i, rid in enumerate(c.request_ids)
        if c.draft_len[i] > 0
    }
    checked = 0
    for p in paired:
        for i, rid in enumerate(p.request_ids):
            key = (rid, int(p.context_len[i]))
            if p.draft_len[i] > 0 and key in own:
                torch.testing.assert_close(p.companion_probs[i, 0], own[key])
                checked += 1
    assert checked > 5


def test_a_companion_pairs_only_with_the_draft_it_was_trained_next_to(target, tmp_path):
    from adactl.runtime.feature_draft import WithCompanion

    fused = FeatureDraft.from_target(target, reduced_vocab(), 64, seed=3, feature_layers=[0, 2], input_norm=True)
    fused.save(tmp_path / "fused")
    other = FeatureDraft.from_target(target, reduced_vocab(), 64, seed=4, feature_layers=[0, 2], input_norm=True)
    other.save(tmp_path / "other")
    mate = FeatureDraft.from_target(target, reduced_vocab(seed=1), 32, seed=5, input_norm=True)
    mate.config.reads_draft = fused.digest
    mate.save(tmp_path / "mate")
    loaded = FeatureDraft.load(tmp_path / "fused", target)
    assert loaded.digest == fused.digest and loaded.config.input_norm
    WithCompanion(loaded, FeatureDraft.load(tmp_path / "mate", target))  # the pair it was trained in
    with pytest.raises(ValueError, match="trained on its outputs"):
        WithCompanion(FeatureDraft.load(tmp_path / "other", target), FeatureDraft.load(tmp_path / "mate", target))
    plain = FeatureDraft.from_target(target, reduced_vocab(), 64, seed=3)
    with pytest.raises(ValueError, match="fused-feature draft"):
        WithCompanion(plain, mate)
    with pytest.raises(ValueError, match="cannot fuse"):
        WithCompanion(loaded, other)
    tiny = LoadedModel(target, None, "tiny")
    with pytest.raises(ValueError, match="is a companion"):  # it reads a draft's features: never alone
        load_draft(str(tmp_path / "mate"), tiny)
    load_draft(str(tmp_path / "fused"), tiny, companion=str(tmp_path / "mate"))


def test_a_retrained_draft_under_the_same_name_gets_its_own_step_cost_profile(target, tmp_path):
    """The step-cost fingerprint carries each feature draft's digest, so a profile cached for a
    draft is not reused for another one saved under the same name."""
    from adactl.profiler import cached_path, fingerprint
    from adactl.runtime.models import ModelPair

    keys = []
    for seed in (3, 4):
        FeatureDraft.from_target(target, reduced_vocab(), 64, seed=seed).save(tmp_path / "draft")
        draft = FeatureDraft.load(tmp_path / "draft", target)
        pair = ModelPair(LoadedModel(target, None, "tiny"), draft, None, torch.device("cpu"), torch.float32,
                         {"target": "tiny", "draft": "draft", "companion": "none"})  # fmt: skip
        assert pair.model_ids["draft"] == f"draft@{draft.digest}" and pair.model_ids["companion"] == "none"
        keys.append(cached_path(fingerprint(pair.model_ids, pair.device, pair.dtype)))
    assert keys[0] != keys[1]
    # a shipped draft keys alike by name, old name or folder
    from adactl.runtime.models import SHIPPED_MODELS, shipped_name

    assert shipped_name("draft3") == shipped_name(str(SHIPPED_MODELS / "draft")) == "draft"
    assert shipped_name(str(tmp_path / "draft")) == str(tmp_path / "draft")


def test_companion_needs_feature_drafts(target, tmp_path):
    target.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="feature drafts"):
        load_draft(str(tmp_path / "plain"), LoadedModel(target, None, "tiny"), companion=str(tmp_path / "plain"))


def _teacher(target, dd, layers: list[int] | None = None, n: int = 64, length: int = 32):
    """Teacher data as the recipes store it: the target's samples, its final hidden states
    and, with `layers` (eagle3), the hidden states a fused draft reads."""
    torch.manual_seed(0)
    with torch.no_grad():
        seqs = target.generate(torch.randint(1, 128, (n, 4)), attention_mask=torch.ones(n, 4, dtype=torch.long),
                               do_sample=True, max_new_tokens=length - 4, min_new_tokens=length - 4)  # fmt: skip
        out = target.model(input_ids=seqs, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i] for i in layers], -1) if layers else None
    return dd.TeacherData(
        seqs.flatten().to(torch.int32),
        torch.ones(seqs.numel(), dtype=torch.bool),
        torch.arange(0, seqs.numel() + 1, seqs.shape[1]),
        out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1]).to(torch.float16),
        aux.reshape(-1, aux.shape[-1]).to(torch.float16) if aux is not None else None,
    )


def _train(dd, draft, data, args, steps: int = 60, driver=None) -> None:
    """`steps` real optimiser steps of the recipe's loss on random batches of 16 sequences."""
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(0)  # the same batches on every run: a pass or failure is reproducible
    for _ in range(steps):
        loss, _ = dd.losses(draft, dd.make_batch(data, rng.sample(range(64), 16)), args, driver)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_training_time_test_passes_are_what_drafting_computes(target):
    """Pass j of the training-time test at position q gives the logits the draft gives when,
    after the true-feature context up to q - j, it drafts j more tokens (here: the right ones)
    from its own features, one forward at a time as the engine does."""
    from transformers import DynamicCache

    dd = distill_module()
    data = _teacher(target, dd, [1, 2], n=2, length=20)
    draft = FeatureDraft.from_target(target, reduced_vocab(), intermediate_size=64, seed=0, feature_layers=[1, 2])
    batch = dd.make_batch(data, [0, 1])
    with torch.no_grad():
        passes = dd.ttt_logits(draft, batch, 3)
        fused = draft.fuse_layers(batch["aux"])
        feat_in = torch.cat([torch.zeros_like(fused[:, :1]), fused[:, :-1]], 1)
        for s in (0, 5, 16):  # the last true position
            cache = DynamicCache()
            out = draft(batch["ids"][:, : s + 1], feat_in[:, : s + 1], cache=cache, use_cache=True)
            torch.testing.assert_close(out.logits[:, -1], passes[0][:, s], atol=1e-4, rtol=1e-4)
            for j in (1, 2):
                pos = torch.full((2, 1), s + j)
                out = draft(batch["ids"][:, s + j : s + j + 1], out.hidden_states[:, -1:], position_ids=pos,
                            cache=cache, use_cache=True)  # fmt: skip
                torch.testing.assert_close(out.logits[:, -1], passes[j][:, s + j], atol=1e-4, rtol=1e-4)


def test_eagle3_recipe_steps_lower_every_pass_loss(target):
    """Real training steps of the eagle3 recipe (fused features, training-time test)."""
    dd = distill_module()
    data = _teacher(target, dd, [1, 2])
    draft = FeatureDraft.from_target(target, reduced_vocab(), intermediate_size=64, seed=0, feature_layers=[1, 2])
    args = dd.Args(recipe="eagle3", feature_layers="1,2", ttt_steps=3, lr=3e-3)
    batch = dd.make_batch(data, list(range(16)))
    head = target.get_output_embeddings().weight.detach()
    before = dd.evaluate(draft, data, head)
    _, first = dd.losses(draft, batch, args)
    _train(dd, draft, data, args, steps=150)
    _, last = dd.losses(draft, batch, args)
    for name in ("ce", "ce2", "ce3"):
        assert last[name] < 0.8 * first[name], (name, first, last)
    after = dd.evaluate(draft, data, head)
    assert {"greedy_agreement", "greedy_agreement_step2", "greedy_agreement_step3"} <= set(after)
    for name in ("greedy_agreement", "greedy_agreement_step2", "greedy_agreement_step3"):
        assert after[name] > 2 * before[name] + 0.02, (name, before, after)


def test_companion_passes_are_what_it_computes_next_to_its_draft(target):
    """A fused draft's companion, in the training-time test, reads what `WithCompanion` gives it
    while drafting (the tokens and features the draft reads: the draft's fused features, then
    its own outputs, one forward at a time; the engine test above runs the pair itself); and
    real training steps lower its loss at every pass without touching the draft."""
    from transformers import DynamicCache

    dd = distill_module()
    data = _teacher(target, dd, [1, 2])
    draft = FeatureDraft.from_target(target, reduced_vocab(), 64, seed=0, feature_layers=[1, 2], input_norm=True)
    companion = FeatureDraft.from_target(target, reduced_vocab(seed=1), 32, seed=1, input_norm=True)
    batch = dd.make_batch(data, [0, 1])
    with torch.no_grad():
        passes = dd.ttt_logits(companion, batch, 3, driver=draft)
        fused = draft.fuse_layers(batch["aux"])
        feat_in = torch.cat([torch.zeros_like(fused[:, :1]), fused[:, :-1]], 1)
        for s in (0, 9, 25):
            caches = DynamicCache(), DynamicCache()
            ids, feats = batch["ids"][:, : s + 1], feat_in[:, : s + 1]
            out = draft(ids, feats, cache=caches[0], use_cache=True)
            mate = companion(ids, feats, cache=caches[1], use_cache=True)
            torch.testing.assert_close(mate.logits[:, -1], passes[0][:, s], atol=1e-4, rtol=1e-4)
            for j in (1, 2):
                pos = torch.full((2, 1), s + j)
                ids, feats = batch["ids"][:, s + j : s + j + 1], out.hidden_states[:, -1:]
                out = draft(ids, feats, position_ids=pos, cache=caches[0], use_cache=True)
                mate = companion(ids, feats, position_ids=pos, cache=caches[1], use_cache=True)
                torch.testing.assert_close(mate.logits[:, -1], passes[j][:, s + j], atol=1e-4, rtol=1e-4)
    args = dd.Args(recipe="eagle3", feature_layers="1,2", ttt_steps=3, lr=3e-3, reads_draft="x")
    batch = dd.make_batch(data, list(range(16)))
    _, first = dd.losses(companion, batch, args, draft)
    before = [p.clone() for p in draft.parameters()]
    _train(dd, companion, data, args, steps=100, driver=draft)
    _, last = dd.losses(companion, batch, args, draft)
    for name in ("ce", "ce2", "ce3"):
        assert last[name] < 0.8 * first[name], (name, first, last)
    assert all(torch.equal(a, b) for a, b in zip(before, draft.parameters()))  # the draft stays as it was
