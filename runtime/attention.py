"""Grouped-query attention with its key/value heads shared inside the kernel on the CPU.

transformers' SDPA attention (5.x) copies every key/value head `num_key_value_groups` times
(`repeat_kv`) whenever it is given a mask and more than one query token, because CUDA's
fast kernels take no mask with `enable_gqa`. The engine's verify forwards are exactly that
(a mask for holes and padding, k + 1 tokens a row), and on the CPU the copy is most of the
step: SmolLM2 (9 query heads on 3 key/value heads) at batch 32 over a 502-column cache, a
k = 1 verify took 2.0 s, 1.1 s of it in the copy, against 0.65 s with the heads shared
inside torch's CPU flash kernel (`enable_gqa=True`), whose results are the same.

`gqa_attention(model)` switches the models' attention to that for the forwards inside it,
on the CPU and only where transformers would pick SDPA; every other case (CUDA, one query
token, no mask, no grouped heads, a soft cap or a position bias) is transformers' own
function unchanged. The model's config is restored after, so the same model used elsewhere
(`generate`) is untouched.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

NAME = "adactl_sdpa_gqa"
_configs: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


def sdpa_gqa_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """query: [B, H, T, D]; key, value: [B, H_kv, S, D]; attention_mask: [B, 1, T, S] or None.
    Returns ([B, T, H, D], None) as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = key.shape[1] != query.shape[1]
    theirs = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None  # not ours to do
    if attention_mask is None or query.shape[2] == 1 or not grouped or query.device.type != "cpu" or theirs:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> bool:
    """Our attention under NAME, with SDPA's mask construction (without one registered,
    transformers builds no mask at all for a custom attention)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # pragma: no cover (transformers 5.x has both)
        return False
    AttentionInterface.register(NAME, sdpa_gqa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True


def _sdpa_configs(model: torch.nn.Module) -> list[Any]:
    """The distinct configs of `model`'s modules (a feature draft's layers have their own)."""
    if model not in _configs:
        seen: dict[int, Any] = {}
        for m in model.modules():
            config = getattr(m, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                seen.setdefault(id(config), config)
        _configs[model] = list(seen.values())
    return _configs[model]


def gqa_attention(
    model: torch.nn.Module, device: torch.device, masked: bool = True, tokens: int = 2
) -> AbstractContextManager[None]:
    """The forwards inside use `sdpa_gqa_forward` where they would use SDPA (CPU only), if
    they pass a mask (`masked`) and more than one query token a row (`tokens`): otherwise the
    two are the same function, and switching costs host time (and, without a mask,
    transformers builds one for an attention it does not know, where SDPA's causal path
    needs none). Where nothing switches, a shared no-op context (a generator-based one costs
    a few microseconds of host time around every draft and decode forward)."""
    if device.type != "cpu" or not _registered or not masked or tokens <= 1:
        return _UNCHANGED
    return _switched(model)


_UNCHANGED = nullcontext()


@contextmanager
def _switched(model: torch.nn.Module) -> Iterator[None]:
    switched = [c for c in _sdpa_configs(model) if c._attn_implementation == "sdpa"]
    for c in switched:
        _set_attention(c, NAME)
    try:
        yield
    finally:
        for c in switched:
            _set_attention(c, "sdpa")


def _set_attention(config: Any, name: str) -> None:
    """`config._attn_implementation = name`; for a config without sub-configs, straight into the
    attribute its property reads (transformers' setter walks the sub-configs, and took 9 us of
    host time for each of the two switches around every masked verify forward)."""
    if getattr(config, "sub_configs", None) or "_attn_implementation_internal" not in vars(config):
        config._attn_implementation = name
    else:
        vars(config)["_attn_implementation_internal"] = name


_registered = _register()
