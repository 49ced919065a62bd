"""Masked grouped-query attention three ways, one layer's call timed alone (issue 31 item 4):
transformers' copy of every key/value head (`repeat_kv`, what the engine ran on CUDA before the
fold), SDPA's own masked `enable_gqa` (falls back to the math kernel on CUDA), and the query
heads folded into rows of their key/value head (`runtime.attention.folded_sdpa`, now the
engine's path). Shapes: the Llama-3.1-8B attention (32 query heads on 8 key/value heads,
head size 128) over a whole-capacity mask, as the engine's static forwards pass it.

    PYTHONPATH=. python docs/gpu/attention_ab.py --device cuda --dtype bfloat16
    PYTHONPATH=. python docs/gpu/attention_ab.py --device cpu --dtype float32 --small   # a dry run

Prints one markdown row per (batch, tokens, columns): median microseconds of each way, and
the fold's speedup over the copy. Also checks the three agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from adactl.runtime.attention import folded_sdpa


def copied(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    g = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=m)


def grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)


def timed(fn, args: tuple, device: torch.device, reps: int) -> float:  # type: ignore[no-untyped-def]
    """Median microseconds of one call (CUDA events on a GPU)."""
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--small", action="store_true", help="a few small shapes (a dry run on the CPU)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    heads, kv_heads, d = 32, 8, 128
    shapes = [(1, 5, 256), (4, 5, 256)] if args.small else [
        (b, t, s) for s in (512, 2048) for b in (1, 16, 32) for t in (1, 5)
    ]  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"{device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} {dtype}, "
          f"{heads} query heads on {kv_heads}, head size {d}, torch {torch.__version__}")  # fmt: skip
    print("| batch | tokens | columns | copy (us) | masked enable_gqa (us) | fold (us) | copy ÷ fold |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for b, t, s in shapes:
            q = torch.randn(b, t, heads, d, device=device, dtype=dtype, generator=gen).transpose(1, 2)
            k, v = torch.randn(2, b, kv_heads, s, d, device=device, dtype=dtype, generator=gen)
            m = torch.rand(b, 1, t, s, device=device, generator=gen) > 0.5
            m[..., -1] = True
            ways = {"copy": copied, "gqa": grouped, "fold": lambda q, k, v, m: folded_sdpa(q, k, v, m)}
            outs = {name: fn(q, k, v, m).float() for name, fn in ways.items()}
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert all(torch.allclose(o, outs["copy"], atol=tol) for o in outs.values()), "the three disagree"
            us = {name: timed(fn, (q, k, v, m), device, args.reps) for name, fn in ways.items()}
            print(f"| {b} | {t} | {s} | {us['copy']:.0f} | {us['gqa']:.0f} | {us['fold']:.0f} | "
                  f"{us['copy'] / us['fold']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
