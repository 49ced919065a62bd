"""Devices, dtypes and the one loader: bad names are clear errors before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from adactl.runtime import Engine, FeatureDraft, SamplingParams, StepPlan, run_to_completion
from adactl.runtime.device import DeviceError, describe, device_and_dtype, resolve_device, resolve_dtype
from adactl.runtime.models import load_pair, perturbed_copy, tiny_llama, tiny_tokenizer

from .helpers import prompts

NO_CUDA = not torch.cuda.is_available()


def test_auto_is_cuda_when_available_else_cpu() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")


@pytest.mark.parametrize("name", ["tpu", "gpu0", "cuda:x", ""])
def test_unknown_device_is_a_clear_error(name: str) -> None:
    with pytest.raises(DeviceError, match="device"):
        resolve_device(name)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_says_what_to_do() -> None:
    with pytest.raises(DeviceError, match="--device cpu"):
        resolve_device("cuda")


def test_dtype_names_and_refusals() -> None:
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    with pytest.raises(DeviceError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(DeviceError, match="not supported"):
        resolve_dtype(torch.float64)


def test_auto_dtype_is_float32_off_cuda_and_tf32_is_asked_for(monkeypatch) -> None:
    """`--dtype auto` (every command's default): float32 on the CPU, bfloat16 on CUDA where it
    runs (a GPU test checks that one); `--allow-tf32` sets the variable `device_and_dtype` reads."""
    import argparse

    from adactl.runtime.device import TF32_ENV, auto_dtype
    from adactl.settings import DeviceSettings, add_arguments, device_environment

    assert resolve_dtype("auto", "cpu") is torch.float32 and auto_dtype(torch.device("mps")) == "float32"
    assert device_and_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    parser = argparse.ArgumentParser()
    add_arguments(parser, DeviceSettings)
    assert parser.parse_args([]).dtype == "auto"
    monkeypatch.delenv(TF32_ENV, raising=False)
    device_environment(parser.parse_args([]))
    assert TF32_ENV not in os.environ
    device_environment(parser.parse_args(["--allow-tf32"]))
    assert os.environ[TF32_ENV] == "1"


def test_load_pair_checks_the_device_before_loading_anything() -> None:
    missing = "/nonexistent/model/dir"
    with pytest.raises(DeviceError):
        load_pair(missing, None, None, device="tpu")
    with pytest.raises(DeviceError):
        load_pair(missing, None, None, device="cpu", dtype="int4")


def test_cli_bad_device_exits_2_with_one_line() -> None:
    """`adactl bench spec --device tpu`: exit 2 and the reason, no traceback, nothing loaded."""
    done = subprocess.run([sys.executable, "-m", "adactl.cli", "bench", "spec", "--device", "tpu"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "unknown device 'tpu'" in done.stderr and "Traceback" not in done.stderr


def test_describe_names_the_machine() -> None:
    m = describe("cpu", torch.bfloat16)
    assert m.device_type == "cpu" and m.dtype == "bfloat16" and m.torch == torch.__version__
    assert m.threads == torch.get_num_threads() and "threads" in m.label and "bfloat16" in m.label


def test_load_pair_puts_both_models_on_the_device_in_the_dtype(tmp_path) -> None:
    target = tiny_llama(seed=0)
    target.save_pretrained(tmp_path / "t")
    tiny_tokenizer().save_pretrained(tmp_path / "t")
    draft = perturbed_copy(target, 0.03, seed=1)
    draft.save_pretrained(tmp_path / "d")
    tiny_tokenizer().save_pretrained(tmp_path / "d")
    pair = load_pair(str(tmp_path / "t"), str(tmp_path / "d"), None, "cpu", "bfloat16")
    assert next(pair.target.model.parameters()).dtype == torch.bfloat16
    assert pair.draft is not None and next(pair.draft.parameters()).dtype == torch.bfloat16
    assert pair.speculator() is pair.draft and pair.specs["companion"] == "none"
    with pytest.raises(ValueError, match="companion"):
        pair.speculator(with_companion=True)


def test_feature_draft_follows_a_bf16_target_and_keeps_rotary_float32() -> None:
    target = tiny_llama(seed=0).to(torch.bfloat16)
    draft = FeatureDraft.from_target(target, list(range(96)), 64, seed=1).eval()
    assert next(draft.parameters()).dtype == torch.bfloat16
    freqs = [b for name, b in draft.named_buffers() if "inv_freq" in name]
    assert freqs and all(b.dtype == torch.float32 for b in freqs)
    engine = Engine(target, draft)  # runs end to end in bf16
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=6)) for p in prompts(3, seed=2)]
    results = run_to_completion(engine, StepPlan(draft_len=2))
    assert all(len(results[r].output_ids) == 6 for r in ids)
    assert engine.kv_bytes() == 0


def test_engine_refuses_a_draft_on_another_device() -> None:
    if NO_CUDA:
        pytest.skip("needs a second device")
    target = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="one device"):
        Engine(target, perturbed_copy(target, 0.03).cuda())


def test_perturbed_copy_follows_the_model() -> None:
    target = tiny_llama(seed=0).to(torch.bfloat16)
    draft = perturbed_copy(target, 0.03, seed=1)
    assert next(draft.parameters()).dtype == torch.bfloat16
    assert device_and_dtype("cpu", "float32") == (torch.device("cpu"), torch.float32)
