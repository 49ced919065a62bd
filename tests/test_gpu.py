"""The same engine code on CUDA (runs where a GPU is present; skipped elsewhere): `make gpu-check`.

Greedy output equal to `generate` for chains, trees and mixed plans; sampled outputs that
follow the target's distribution (chi-square); bf16 greedy against `generate` in bf16 (a
near-tie that flips is reported with its token and margin); feature drafts in the target's
dtype; KV bytes back to 0; `adactl serve` answering on CUDA.
"""

from __future__ import annotations

import warnings

import httpx
import pytest
import torch

from adactl.runtime import Engine, FeatureDraft, SamplingParams, StepPlan, TreeSpec, run_to_completion
from adactl.runtime import verify_chains as rejection_rule
from adactl.runtime.models import perturbed_copy, tiny_llama, tiny_tokenizer

from .helpers import prompts, random_plan_runner
from .test_engine_sampling import VOCAB, chi_square_p, exact_marginals, sampled_marginals

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def generate_greedy(target: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    device = next(target.parameters()).device
    out = target.generate(torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def assert_greedy_equal(target: torch.nn.Module, prompt: list[int], got: list[int], ref: list[int],
                        tie: float = 0.0) -> None:  # fmt: skip
    """Equal, or (with `tie` > 0) different only where the target's two best logits are within
    `tie` of each other at the first difference: then the message names the tokens and margin."""
    if got == ref:
        return
    j = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    device = next(target.parameters()).device
    with torch.no_grad():
        logits = target(torch.tensor([prompt + ref[:j]], device=device)).logits[0, -1].float()
    margin = float(logits[ref[j]] - logits[got[j]]) if j < min(len(got), len(ref)) else float("inf")
    message = (f"first difference at token {j}: engine {got[j] if j < len(got) else None}, generate "
               f"{ref[j] if j < len(ref) else None}, logit margin {margin:.4g}")  # fmt: skip
    assert abs(margin) <= tie, message
    print("near-tie:", message)


@pytest.mark.parametrize(
    "plan",
    [StepPlan(draft_len=3), StepPlan(tree=TreeSpec(depth=3, width=2, nodes=6)), None],
    ids=["chain", "tree", "mixed"],
)
def test_greedy_on_cuda_matches_generate(plan: StepPlan | None) -> None:
    target = tiny_llama(seed=0).cuda()
    draft = perturbed_copy(target, noise=0.03, seed=1)
    engine = Engine(target, draft)
    ps = prompts(6, seed=3)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=16)) for p in ps]
    if plan is None:  # random per-row draft lengths (0 included) and verify cuts
        random_plan_runner(engine, seed=5)
        results = {r.request_id: r for r in engine.pop_finished()}
    else:
        results = run_to_completion(engine, plan)
    for rid, p in zip(ids, ps):
        assert results[rid].output_ids == generate_greedy(target, p, 16)
    assert_memory_freed(engine)


def test_sampled_outputs_on_cuda_follow_the_target() -> None:
    target = tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=3, init_std=0.1)
    draft = tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=1, seed=4, init_std=0.1)
    p2, p3 = exact_marginals(target, 1.0, 1.0)  # on the CPU: the reference
    c2, c3 = sampled_marginals((target.cuda(), draft.cuda()), rejection_rule, 1.0, 1.0, seed=0)
    assert chi_square_p(c2, p2) > 1e-3
    assert chi_square_p(c3, p3) > 1e-3


def assert_memory_freed(engine: Engine) -> None:
    """Drained, an engine keeps only the memory of caches whose graphs replay into it or that
    hold a reservation (`adactl serve` reserves its rows on CUDA); closed, none."""
    assert not engine.has_unfinished()
    kept = [kv for kv in engine.rows.caches() if kv.nbytes()]
    assert all((engine.graphs is not None and kv.owner in engine.graphs.owners()) or kv.reserved != (0, 0)
               for kv in kept)  # fmt: skip
    engine.close()
    assert engine.kv_bytes() == 0 and engine.graph_stats()["graphs"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_greedy_matches_generate_in_that_dtype(dtype: torch.dtype) -> None:
    target = tiny_llama(seed=0).to("cuda", dtype)
    for draft in (perturbed_copy(target, noise=0.03, seed=1),
                  FeatureDraft.from_target(target, list(range(96)), 64, seed=1).eval()):  # fmt: skip
        assert next(draft.parameters()).dtype == dtype  # drafts follow the target's dtype
        engine = Engine(target, draft)
        ps = prompts(4, seed=7)
        ids = [engine.add_request(p, SamplingParams(max_new_tokens=12)) for p in ps]
        results = run_to_completion(engine, StepPlan(draft_len=3))
        for rid, p in zip(ids, ps):
            assert_greedy_equal(target, p, results[rid].output_ids, generate_greedy(target, p, 12), tie=0.05)
        assert_memory_freed(engine)


def test_feature_draft_keeps_rotary_frequencies_in_float32() -> None:
    target = tiny_llama(seed=0).to("cuda", torch.bfloat16)
    draft = FeatureDraft.from_target(target, list(range(96)), 64)
    freqs = [b for name, b in draft.named_buffers() if "inv_freq" in name]
    assert freqs and all(b.dtype == torch.float32 and b.is_cuda for b in freqs)


def test_adactl_serve_answers_on_cuda(tmp_path) -> None:
    """`adactl serve --device cuda` built as the command builds it, on a saved tiny model."""
    from adactl import settings
    from adactl.server import ServerThread
    from adactl.server.main import ServeSettings, build_server

    model_dir = tmp_path / "tiny"
    tiny_llama(seed=0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    args = settings.parse(ServeSettings, ["--model", str(model_dir), "--draft", "none", "--controllers", "fcfs",
                                          "--device", "cuda"])  # fmt: skip
    server = build_server(args)
    engine = server.service.engine
    assert next(engine.target.parameters()).is_cuda
    # its rows reserved and the decode graphs captured before the first request
    assert engine.rows.target.reserved[0] == args.max_batch and engine.graph_stats()["captures"] > 0
    with ServerThread(server.app) as thread:
        reply = httpx.post(thread.url + "/v1/completions", json={"model": server.model_name, "prompt": "Hello",
                           "max_tokens": 8, "temperature": 0}, timeout=60)  # fmt: skip
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
    assert_memory_freed(server.service.engine)


def test_profile_on_cuda_is_keyed_by_the_gpu(tmp_path, monkeypatch) -> None:
    from adactl.profiler import make_profile, tiny_pair

    monkeypatch.setenv("ADACTL_CACHE", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = make_profile(tiny_pair("cuda", torch.float32), max_batch=8, budget_s=10, progress=False)
    # the batch grows, so caches reallocate and drop every graph: each later capture must work
    # (reusing the emptied memory pool failed an assert in torch 2.11; every step then ran eagerly)
    assert not [w for w in caught if "could not be captured" in str(w.message)]
    assert made.fingerprint.device_type == "cuda"
    assert made.fingerprint.device_name == torch.cuda.get_device_name()
    assert len(made.steps) > 20 and made.meta["fit_mape"] < 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_replay_the_eager_outputs(dtype: torch.dtype) -> None:
    """Graphs (on by default on CUDA) decode what eager forwards decode, for chains, trees
    and mixed plans; a second pass over the same shapes captures nothing new (it replays)."""
    from adactl.runtime import EngineConfig

    target = tiny_llama(seed=0).to("cuda", dtype)
    draft = perturbed_copy(target, noise=0.03, seed=1)
    ps = prompts(10, seed=11)

    def run(engine: Engine, seed: int) -> list[list[int]]:
        ids = [engine.add_request(p, SamplingParams(max_new_tokens=20)) for p in ps]
        random_plan_runner(engine, seed=seed, max_k=5)
        out = {r.request_id: r.output_ids for r in engine.pop_finished()}
        return [out[i] for i in ids]

    graphed = Engine(target, draft)
    assert graphed.graphs is not None
    eager = Engine(target, draft, config=EngineConfig(graphs=False))
    for seed in (5, 6):
        got, want = run(graphed, seed), run(eager, seed)
        for p, g, w in zip(ps, got, want):
            assert_greedy_equal(target, p, g, w, tie=0.0 if dtype == torch.float32 else 0.05)
    captured = graphed.graphs.captures
    assert captured > 0 and graphed.rows.target.static_forwards > 0
    run(graphed, 5)
    assert graphed.graphs.captures == captured  # the same shapes again: replays only
    assert_memory_freed(graphed)


def test_cuda_graph_decode_step_is_faster_than_eager() -> None:
    """A plain decode step at batch 1 and 16: replayed graphs beat eager launches."""
    import time

    from adactl.runtime import EngineConfig

    target = tiny_llama(seed=0).cuda()
    times = {}
    for graphs in (False, True):
        for batch in (1, 16):
            engine = Engine(target, None, config=EngineConfig(graphs=graphs))
            for p in prompts(batch, seed=1):
                engine.add_request(p, SamplingParams(max_new_tokens=64, stop_on_eos=False))
            for _ in range(8):  # prefill, warm-up and captures
                engine.step(StepPlan(prefill_budget=4096))
            best = float("inf")
            for _ in range(12):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                engine.step(StepPlan(prefill_budget=0))
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            times[graphs, batch] = best
    print({f"{'graphs' if g else 'eager'} batch {b}": f"{1000 * t:.2f} ms" for (g, b), t in times.items()})
    for batch in (1, 16):
        assert times[True, batch] < 0.8 * times[False, batch]


def test_auto_dtype_is_bfloat16_and_masked_attention_folds_on_cuda() -> None:
    """`--dtype auto` serves bfloat16 on CUDA; the folded masked attention (every masked
    forward on CUDA) equals SDPA over copied key/value heads there, in bfloat16, one and five
    query tokens a row."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from adactl.runtime.attention import folded_sdpa
    from adactl.runtime.device import resolve_dtype

    assert resolve_dtype("auto", "cuda") is (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for tokens in (1, 5):
        query = torch.randn(4, tokens, 32, 128, device="cuda", generator=gen, dtype=torch.bfloat16).transpose(1, 2)
        key, value = torch.randn(2, 4, 8, 256, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        mask = torch.rand(4, 1, tokens, 256, device="cuda", generator=gen) > 0.3
        mask[..., -1] = True
        want = torch.nn.functional.scaled_dot_product_attention(query, repeat_kv(key, 4), repeat_kv(value, 4),
                                                                attn_mask=mask)  # fmt: skip
        got = folded_sdpa(query, key, value, mask)
        assert torch.allclose(got.float(), want.float(), atol=2e-2), (got - want).abs().max()
