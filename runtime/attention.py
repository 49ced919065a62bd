"""Grouped-query attention with a mask, without a copy of every key/value head.

transformers' SDPA attention (5.x) copies every key/value head `num_key_value_groups` times
(`repeat_kv`) whenever it is given a mask and more than one query token, because CUDA's fast
kernels take no mask with `enable_gqa` (masked `enable_gqa` falls back to the math kernel
there). The engine's verify forwards are exactly that (a mask for holes and padding, k + 1
tokens a row; every static forward masks over the cache's whole capacity). On the CPU the
copy was most of the step: SmolLM2 (9 query heads on 3 key/value heads) at batch 32 over a
502-column cache, a k = 1 verify took 2.0 s, 1.1 s of it in the copy. On a GPU it is bytes:
at the Llama-3-8B shape (32 on 8 heads), 16 rows and 2,048 columns, about 17 GB written and
read per verify step.

`folded_sdpa` folds instead: the G query heads that share a key/value head become G·T query
rows of that one head (the mask repeated G times along the query rows, a few kilobytes), so
one SDPA call over the key/value heads as they are computes the same outputs, with any mask,
on any backend that takes a mask (CUDA's memory-efficient and cuDNN kernels, the CPU's flash
kernel). transformers folds the same way for one query token (`pack_gqa`, in recent 5.x
releases), not for more. On this CPU the fold also beats torch's own masked `enable_gqa`
kernel, the path before it, in attention alone (`docs/gpu/attention_ab.py --device cpu
--dtype float32 --small`, the 8B heads, 5 tokens, 256 columns, two runs: batch 1 180–237
against 273–351 us, batch 4 660–1,253 against 1,233–1,691 us; the copy 416–582 and
3,816–5,733 us), though a whole engine step does not show it (fold ÷ `enable_gqa` 0.96–1.03
at batch 1–32, k = 1–4: `docs/issue31/gqa_fold.py`). What it is for is CUDA.

`gqa_attention(model, device, masked, tokens)` switches the models' attention to that for the
forwards inside it where transformers would pick SDPA and it would copy: a mask, grouped
heads, and more than one query token (on CUDA also one: transformers before `pack_gqa`
copied there too, and a replayed graph pays no host time for the switch). Every other case
(no mask, no grouped heads, a per-head mask, a soft cap or a position bias) is transformers'
own function unchanged. The model's config is restored after, so the same model used
elsewhere (`generate`) is untouched.
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
    if attention_mask is None or not grouped or attention_mask.shape[1] != 1 or theirs:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    out = folded_sdpa(query, key, value, attention_mask, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


def folded_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """Masked grouped-query attention as one SDPA call over the key/value heads (module docstring).
    query: [B, H, T, D]; key, value: [B, H_kv, S, D] with H a multiple of H_kv (query head h
    reads key/value head h // (H / H_kv), transformers' `repeat_kv` order); mask: [B or 1, 1,
    T or 1, S], boolean (True: seen) or additive. Returns [B, H, T, D_v]."""
    b, h, t, d = query.shape
    heads = key.shape[1]
    if h % heads:
        raise ValueError(f"{h} query heads cannot share {heads} key/value heads")
    groups = h // heads
    q = query.reshape(b, heads, groups * t, d)  # query row (j, t) of head kv: query head kv * groups + j
    if mask.shape[2] != 1:  # per-token rows: the same mask row for each of the head's G query heads
        mb, s = mask.shape[0], mask.shape[3]
        mask = mask[:, :, None].expand(mb, 1, groups, t, s).reshape(mb, 1, groups * t, s)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, attn_mask=mask, dropout_p=dropout, scale=scale
    )
    return out.reshape(b, h, t, out.shape[-1])


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
    """The forwards inside use `sdpa_gqa_forward` where they would use SDPA, if they pass a
    mask (`masked`) and more than one query token a row (`tokens`; on CUDA also one): otherwise
    the two are the same function, and switching costs host time (and, without a mask,
    transformers builds one for an attention it does not know, where SDPA's causal path needs
    none). MPS is left to transformers (its masked `enable_gqa`). Where nothing switches, a
    shared no-op context (a generator-based one costs a few microseconds of host time around
    every draft and decode forward)."""
    if not _registered or not masked or (tokens <= 1 and device.type != "cuda") or device.type == "mps":
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
