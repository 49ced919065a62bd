"""Shared fixtures: tiny random Llama pairs built in-process (milliseconds, no download)."""

from __future__ import annotations

import gc

import pytest
import torch

from adactl.runtime.models import perturbed_copy, tiny_llama

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _unfrozen_heap():
    """`freeze_heap` (benches, the server) pins every object alive at the time for the process's
    life, as a server wants; a test suite drops its models test after test, so each test gives
    the frozen objects back to the collector."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def target() -> torch.nn.Module:
    return tiny_llama(vocab_size=128, num_layers=2, seed=0)


@pytest.fixture(scope="session")
def draft(target: torch.nn.Module) -> torch.nn.Module:
    """Agrees with the target's argmax about half the time: both accept and reject paths run."""
    return perturbed_copy(target, noise=0.03, seed=1)


@pytest.fixture(scope="session")
def other_draft() -> torch.nn.Module:
    """A draft of a different shape (1 layer, other weights) with the same vocabulary."""
    return tiny_llama(vocab_size=128, num_layers=1, hidden_size=32, seed=7)
