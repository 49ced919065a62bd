"""adactl.runtime: a batched, lossless speculative-decoding engine on Hugging Face models.

The engine (`Engine`) runs one step at a time from a `StepPlan` and reports plain data
(`DraftBatch`, `StepOutcome`); `kv` is the only module that touches KV caches; `verify`
holds the lossless acceptance rules as pure functions; `models` loads target/draft pairs
(`load_pair`, on a device in a dtype, both checked by `device`);
`feature_draft` is the EAGLE-style draft that reads the target's hidden state; `stream` keeps
the account of a streaming consumer (units ready, read, missed).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine, EngineConfig, freeze_heap, run_to_completion
    from .feature_draft import FeatureDraft
    from .kv import BatchKV, KVConfig
    from .models import LoadedModel, ModelPair, check_same_vocabulary, load_draft, load_model, load_pair, tiny_llama
    from .stream import Playback, Stream, StreamError, StreamProgress
    from .types import (
        SLO,
        DraftBatch,
        KVState,
        RequestError,
        RequestResult,
        RequestView,
        SamplingParams,
        StepOutcome,
        StepPlan,
        TreeSpec,
    )
    from .verify import VerifyResult, process_logits, verify_chains, verify_trees

# Loaded on first use (PEP 562): importing the plain data (`adactl.runtime.types`, and so
# `adactl.interface`) must not load the engine, the models or transformers.
_HOME = {
    **dict.fromkeys(["Engine", "EngineConfig", "freeze_heap", "run_to_completion"], "engine"),
    "FeatureDraft": "feature_draft",
    **dict.fromkeys(["BatchKV", "KVConfig"], "kv"),
    **dict.fromkeys(
        ["LoadedModel", "ModelPair", "check_same_vocabulary", "load_draft", "load_model", "load_pair", "tiny_llama"],
        "models",
    ),  # fmt: skip
    **dict.fromkeys(["Playback", "Stream", "StreamError", "StreamProgress"], "stream"),
    **dict.fromkeys(
        [
            "SLO",
            "DraftBatch",
            "KVState",
            "RequestError",
            "RequestResult",
            "RequestView",
            "SamplingParams",
            "StepOutcome",
            "StepPlan",
            "TreeSpec",
        ],
        "types",
    ),  # fmt: skip
    **dict.fromkeys(["VerifyResult", "process_logits", "verify_chains", "verify_trees"], "verify"),
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BatchKV",
    "DraftBatch",
    "Engine",
    "EngineConfig",
    "FeatureDraft",
    "KVConfig",
    "KVState",
    "LoadedModel",
    "ModelPair",
    "Playback",
    "RequestError",
    "RequestResult",
    "RequestView",
    "SLO",
    "SamplingParams",
    "StepOutcome",
    "StepPlan",
    "Stream",
    "TreeSpec",
    "StreamError",
    "StreamProgress",
    "VerifyResult",
    "check_same_vocabulary",
    "freeze_heap",
    "load_draft",
    "load_model",
    "load_pair",
    "process_logits",
    "run_to_completion",
    "tiny_llama",
    "verify_chains",
    "verify_trees",
]
