"""The same engine code on CUDA (runs where a GPU is present; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from adactl.runtime import Engine, SamplingParams, StepPlan, TreeSpec, run_to_completion
from adactl.runtime.models import perturbed_copy, tiny_llama

from .helpers import prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("plan", [StepPlan(draft_len=3), StepPlan(tree=TreeSpec(depth=3, width=2, nodes=6))])
def test_greedy_on_cuda_matches_generate(plan):
    target = tiny_llama(seed=0).cuda()
    draft = perturbed_copy(target, noise=0.03, seed=1)
    engine = Engine(target, draft)
    ps = prompts(4, seed=3)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=16)) for p in ps]
    results = run_to_completion(engine, plan)
    for rid, p in zip(ids, ps):
        ref = target.generate(torch.tensor([p], device="cuda"), max_new_tokens=16, do_sample=False)
        assert results[rid].output_ids == ref[0, len(p) :].tolist()
    assert engine.kv_bytes() == 0
