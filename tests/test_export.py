"""`adactl export`: the goodput-optimal schedule in vLLM's and SGLang's forms, every rule checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adactl import export
from adactl.cli import main
from adactl.estimators.step_cost import BASIS, PARTS, StepCostModel, StepCostProfile
from adactl.export import ExportError, check_sglang, check_vllm, ranges, schedule, sglang_config, vllm_config
from adactl.runtime.models import SHIPPED_MODELS

CPU = SHIPPED_MODELS / "estimators" / "step_cost_cpu.json"


def linear_cost(per_verify_token: float) -> StepCostModel:
    """A step of 10 ms plus `per_verify_token` seconds per verified token (and 1 ms per draft forward)."""
    theta = np.zeros((len(BASIS), len(PARTS)))
    theta[BASIS.index("step"), PARTS.index("verify_s")] = 0.010
    theta[BASIS.index("verify_tokens"), PARTS.index("verify_s")] = per_verify_token
    theta[BASIS.index("draft_forwards"), PARTS.index("draft_s")] = 0.001
    return StepCostModel(theta, refine=False)


def unit_scale() -> float:
    """What one unit of the verify_tokens feature is, in tokens (the basis scales its features)."""
    from adactl.estimators.step_cost import features
    from adactl.estimators.step_time import StepShape

    return float(features([StepShape(1, 1, 1, 0, 0, 0, 1)])[0, BASIS.index("verify_tokens")])


def test_cheap_verification_drafts_more_than_dear():
    alpha = torch.full((6,), 0.8)
    scale = unit_scale()
    cheap = schedule(linear_cost(0.00002 / scale), alpha, 64)
    dear = schedule(linear_cost(0.002 / scale), alpha, 64)
    assert all(c[0] >= d[0] for c, d in zip(cheap, dear))
    assert sum(c[0] for c in cheap) > sum(d[0] for d in dear)
    assert dear[-1][0] < dear[0][0]  # verification grows dear with the batch: fewer tokens drafted


def test_ranges_cover_every_batch_size_once():
    per_batch = [[3], [3], [2], [2], [2], [0]]
    assert ranges(per_batch) == [(1, 2, [3]), (3, 5, [2]), (6, 6, [0])]
    config = vllm_config(per_batch, 4, {"method": "eagle", "model": "d"})
    assert config["num_speculative_tokens_per_batch_size"] == [[1, 2, 3], [3, 5, 2], [6, 6, 0]]
    assert config["method"] == "eagle" and config["num_speculative_tokens"] == 4
    assert sglang_config(per_batch) == {"1": {"candidate_steps": [3]}, "3": {"candidate_steps": [2]},
                                        "6": {"candidate_steps": [0]}}  # fmt: skip


@pytest.mark.parametrize(
    "table, k, match",
    [
        ([[2, 4, 1]], 4, "start at batch size 1"),
        ([[1, 4, 1], [3, 8, 2]], 4, "overlaps"),
        ([[1, 4, 1], [6, 5, 2]], 4, "empty"),
        ([[1, 4, 5]], 4, "K must be in"),
        ([[1, 4, -1]], 4, "K must be in"),
        ([[1, 4]], 4, r"\[lo, hi, K\]"),
        ([[1, 4, 1.5]], 4, r"\[lo, hi, K\]"),
        ([], 4, "non-empty"),
        ([[1, 4, 1]], 0, "positive integer"),
    ],
)
def test_vllm_rules(table, k, match):
    with pytest.raises(ExportError, match=match):
        check_vllm({"num_speculative_tokens": k, "num_speculative_tokens_per_batch_size": table})


@pytest.mark.parametrize(
    "config, match",
    [
        ({}, "maps batch-size"),
        ({"ema_alpha": 0.2}, "maps batch-size"),
        ({"1": {"candidate_steps": []}}, "non-empty"),
        ({"1": {"candidate_steps": [1, 1]}}, "distinct"),
        ({"1": {"candidate_steps": [-1]}}, "non-negative"),
        ({"1": {"candidate_steps": [1]}, "one": {"candidate_steps": [1]}}, "neither"),
        ({"1": [1]}, "must be an object"),
        ({"1": {"candidate_steps": [1]}, "update_interval": 2.5}, "an integer"),
        ({"1": {"candidate_steps": [1], "down_hysteresis": "low"}}, "a number"),
    ],
)
def test_sglang_rules(config, match):
    with pytest.raises(ExportError, match=match):
        check_sglang(config)


def test_sglang_accepts_its_documented_example():
    knobs = {"ema_alpha": 0.2, "warmup_batches": 10, "update_interval": 5}
    first = {"candidate_steps": [1, 3, 7], "down_hysteresis": -0.25}
    check_sglang({**knobs, "1": first, "8": {"candidate_steps": [1]}})
    check_vllm({"method": "eagle", "model": "m", "num_speculative_tokens": 3,
                "num_speculative_tokens_per_batch_size": [[1, 64, 3], [65, 128, 1], [129, 512, 0]]})  # fmt: skip
    check_vllm({"num_speculative_tokens": 3, "num_speculative_tokens_per_batch_size": [[1, 8, 3], [17, 32, 1]]})


def test_export_commands_write_files_the_rules_accept(tmp_path, capsys):
    out = tmp_path / "spec.json"
    assert main(["export", "vllm", "--profile", str(CPU), "--max-batch", "64", "--out", str(out),
                 "--base", '{"method": "eagle", "model": "my-draft"}']) == 0  # fmt: skip
    config = json.loads(out.read_text())
    check_vllm(config)
    assert config["method"] == "eagle" and config["num_speculative_tokens_per_batch_size"][-1][1] == 64
    assert main(["export", "sglang", "--alpha", "0.8", "--candidates", "2", "--max-batch", "32"]) == 0
    printed = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the vllm line
    check_sglang(printed)
    assert all(len(v["candidate_steps"]) <= 2 for v in printed.values())


def test_bad_profiles_and_requests_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["export", "vllm", "--profile", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["export", "vllm", "--num-speculative-tokens", "0"]) == 2
    assert main(["export", "vllm", "--alpha", "1.5"]) == 2
    assert main(["export", "vllm", "--acceptance", "companion"]) == 2
    assert "moving_average" in capsys.readouterr().err
    with pytest.raises(ExportError, match=">= 1"):
        schedule(StepCostProfile.load(CPU).model(refine=False), torch.full((4,), 0.5), 0)
    with pytest.raises(ExportError, match="probabilities"):
        schedule(StepCostProfile.load(CPU).model(refine=False), torch.tensor([1.5]), 4)
    assert export.ExportError is ExportError


def test_a_learned_policy_exports_its_choices(tmp_path, capsys):
    out = tmp_path / "sglang.json"
    assert main(["export", "sglang", "--policy", "shipped", "--max-batch", "16", "--out", str(out)]) == 0
    check_sglang(json.loads(out.read_text()))
    streaming = SHIPPED_MODELS / "policies" / "Streaming-v0.safetensors"
    assert main(["export", "vllm", "--policy", str(streaming)]) == 2
    assert "SpecDecode-v0" in capsys.readouterr().err
    assert main(["export", "vllm", "--policy", str(tmp_path / "missing.safetensors")]) == 2


def test_sglang_slots_at_cuda_graph_sizes():
    per_batch = [[3], [3], [2], [2], [2], [1], [1], [0]]
    assert sglang_config(per_batch, [1, 2, 4, 8]) == {"1": {"candidate_steps": [3]}, "4": {"candidate_steps": [2]},
                                                      "8": {"candidate_steps": [0]}}  # fmt: skip
    with pytest.raises(ExportError, match="no CUDA-graph batch size"):
        sglang_config(per_batch, [16, 32])
