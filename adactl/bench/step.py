"""`adactl bench step`: what one engine step costs, next to the floor a step can reach.

For each model shape (random weights of a real model's shape: no download, any size the
device holds), each batch size and each draft length k:
- **engine**: `Engine.step(StepPlan(draft_len=k))` on B requests of `--prompt-len` random
  prompt tokens, already prefilled, with a random feature draft (so drafts are rejected and
  every step has the same shape); fastest and median of `--steps` timed steps, and the
  step's draft and verify parts (`StepOutcome.draft_s`, `verify_s`);
- **bare**: transformers' own forward of the same shape over a `StaticCache` holding the
  same context, for 1 and k + 1 tokens per row: eager, and on CUDA captured once as a CUDA
  graph and replayed. That is what a step costs with no engine around it.

The summary rows are the issue-19 targets: the engine's plain step over the bare graph
forward (<= 1.3 at batch 1 and 16) and its verify of 5 tokens per row over 1 (<= 1.2 at
batch 1). On a CPU there are no graphs: the ratio is to the bare eager forward.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from adactl import settings
from adactl.bench.common import format_table, release_freed_memory, save_figure, write_json
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.device import describe, device_and_dtype, graphs_wanted
from adactl.runtime.feature_draft import FeatureDraft
from adactl.runtime.kv import cache_kwargs
from adactl.settings import DeviceSettings, setting

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}  # fmt: skip
"""Model shapes by name (Llama configurations; weights are random)."""

DRAFT_VOCAB = 8192  # the random feature draft proposes from the first this many token ids


def random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """A Llama of a named shape with random weights, built on the device in its dtype."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: choose from {', '.join(SHAPES)}")
    config = LlamaConfig(**SHAPES[shape])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def random_draft(target: LlamaForCausalLM, seed: int = 0) -> FeatureDraft:
    """A freshly initialised feature draft for `target`, proposing from its first `DRAFT_VOCAB` token ids."""
    vocab = target.config.vocab_size
    return FeatureDraft.from_target(target, list(range(min(DRAFT_VOCAB, vocab))), seed=seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int = 2) -> list[float]:
    """Seconds per call of `fn`, each between two device syncs, after `warmup` calls."""
    out = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def static_forward(model: LlamaForCausalLM, context: torch.Tensor, ids: torch.Tensor) -> Callable[[], Any]:
    """transformers' forward of `ids [B, T]` after `context [B, P]` held in a `StaticCache`:
    the context is cached now; each call of the returned function rewrites positions
    [P, P + T) and returns the model's output (the same every time)."""
    (batch, prompt_len), tokens = context.shape, ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + tokens)
    positions = torch.arange(prompt_len, device=context.device)[None].expand(batch, prompt_len)
    model(input_ids=context, position_ids=positions, use_cache=True, **cache_kwargs(model, cache))
    pos = torch.arange(prompt_len, prompt_len + tokens, device=ids.device)[None].expand(batch, tokens)
    # transformers before 5.2x writes a static cache at `cache_position`, later ones count its length
    where = {"cache_position": pos[0]} if "cache_position" in inspect.signature(model.forward).parameters else {}

    def forward() -> Any:
        for layer in cache.layers:
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                length.fill_(prompt_len)
        return model(input_ids=ids, position_ids=pos, use_cache=True, **cache_kwargs(model, cache), **where)

    return forward


@torch.inference_mode()
def bare_forward(
    model: LlamaForCausalLM, batch: int, prompt_len: int, tokens: int, steps: int, graph: bool
) -> list[float]:
    """Seconds per `static_forward` of `tokens` new tokens per row after `prompt_len`, eager
    or replayed from a CUDA graph."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    context = torch.randint(vocab, (batch, prompt_len), device=device)
    forward = static_forward(model, context, torch.randint(vocab, (batch, tokens), device=device))
    if not graph:
        return _times(forward, device, steps)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream(device).wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        forward()
    return _times(cuda_graph.replay, device, steps)


@torch.inference_mode()
def engine_steps(
    target: LlamaForCausalLM, batch: int, prompt_len: int, ks: list[int], steps: int, graphs: bool, seed: int = 0
) -> dict[int, dict[str, float]]:
    """Per draft length k: the engine's step (fastest and median ms) and its draft and verify
    parts (median ms), on `batch` prefilled requests."""
    device = next(target.parameters()).device
    vocab = target.config.vocab_size
    draft = random_draft(target, seed)
    engine = Engine(target, draft, config=EngineConfig(max_batch_size=batch, seed=seed, graphs=graphs))
    gen = torch.Generator().manual_seed(seed)
    need = (steps + 2) * (max(ks) + 1) * len(ks) + 8
    sampling = SamplingParams(max_new_tokens=need, temperature=0.0, stop_on_eos=False)
    for _ in range(batch):
        engine.add_request(torch.randint(vocab, (prompt_len,), generator=gen).tolist(), sampling)
    while any(v.status != "running" for v in engine.requests()):
        engine.step(StepPlan(draft_len=0, prefill_budget=batch * prompt_len))
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        parts: list[tuple[float, float]] = []

        def step(k: int = k, parts: list[tuple[float, float]] = parts) -> None:
            o = engine.step(StepPlan(draft_len=k))
            parts.append((o.draft_s, o.verify_s))

        times = _times(step, device, steps)
        parts = parts[-steps:]
        out[k] = {
            "engine_ms": 1000 * min(times),
            "engine_ms_median": 1000 * statistics.median(times),
            "draft_ms": 1000 * statistics.median(p[0] for p in parts),
            "verify_ms": 1000 * statistics.median(p[1] for p in parts),
        }
    return out


def measure(
    shape: str, batches: list[int], ks: list[int], prompt_len: int, steps: int, device: torch.device,
    dtype: torch.dtype, graphs: bool, bar: tqdm,
) -> list[dict[str, Any]]:  # fmt: skip
    """One record per (batch, k) for one shape."""
    model = random_model(shape, device, dtype)
    graph = graphs and device.type == "cuda"
    records = []
    for batch in batches:
        bare: dict[int, dict[str, float | None]] = {}
        for tokens in sorted({1, *(k + 1 for k in ks)}):
            eager = bare_forward(model, batch, prompt_len, tokens, steps, graph=False)
            replay = bare_forward(model, batch, prompt_len, tokens, steps, graph=True) if graph else None
            floor = replay or eager
            bare[tokens] = {"eager": 1000 * min(eager), "graph": 1000 * min(replay) if replay else None,
                            "median": 1000 * statistics.median(floor)}  # fmt: skip
        engine = engine_steps(model, batch, prompt_len, ks, steps, graphs)
        for k in ks:
            fastest = bare[k + 1]["graph"] or bare[k + 1]["eager"]
            median = bare[k + 1]["median"]
            assert fastest is not None and median is not None
            records.append({"shape": shape, "batch": batch, "k": k, **engine[k],
                            "bare_eager_ms": bare[k + 1]["eager"], "bare_graph_ms": bare[k + 1]["graph"],
                            "bare_median_ms": median, "engine_over_bare": engine[k]["engine_ms"] / fastest,
                            "median_over_bare": engine[k]["engine_ms_median"] / median})  # fmt: skip
            bar.update(1)
        release_freed_memory()
    del model
    release_freed_memory()
    return records


def targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue-19 targets from the records, with whether each holds."""
    rows = []
    by = {(r["shape"], r["batch"], r["k"]): r for r in records}
    for (shape, batch, k), r in sorted(by.items()):
        if k == 0 and batch in (1, 16):
            rows.append({"shape": shape, "target": f"plain step / bare forward, batch {batch} (medians)",
                         "value": r["median_over_bare"], "fastest": r["engine_over_bare"], "bar": 1.3,
                         "met": r["median_over_bare"] <= 1.3})  # fmt: skip
        if k == 4 and batch == 1 and (shape, 1, 0) in by:
            ratio = r["verify_ms"] / by[(shape, 1, 0)]["verify_ms"]
            rows.append({"shape": shape, "target": "verify 5 tokens / 1 token, batch 1 (medians)",
                         "value": ratio, "fastest": None, "bar": 1.2, "met": ratio <= 1.2})  # fmt: skip
    return rows


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in records))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in records if r["shape"] == shape]
        for i, batch in enumerate(sorted({r["batch"] for r in mine})):
            rows = sorted((r for r in mine if r["batch"] == batch), key=lambda r: r["k"])
            color = f"C{i}"
            ax.plot([r["k"] for r in rows], [r["engine_ms"] for r in rows], "o-", color=color,
                    label=f"engine, batch {batch}")  # fmt: skip
            floor = [r["bare_graph_ms"] or r["bare_eager_ms"] for r in rows]
            ax.plot([r["k"] for r in rows], floor, "x--", color=color, alpha=0.6,
                    label=f"bare {'graph' if rows[0]['bare_graph_ms'] else 'eager'}, batch {batch}")  # fmt: skip
        ax.set_xticks(sorted({r["k"] for r in mine}))
        ax.set_xlabel("draft length k (bare: k + 1 tokens per row)")
        ax.set_ylabel("ms per step (fastest)")
        ax.set_yscale("log")
        ax.set_title(shape)
        ax.legend(fontsize=7)
    save_figure(fig, path, title, fontsize=9)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


@dataclass(frozen=True)
class StepSettings(DeviceSettings):
    """`adactl bench step`."""

    shapes: str | None = setting(None, f"model shapes, comma-separated, from {', '.join(SHAPES)} (default: "
                                 "smollm2-135m, and llama-3.1-8b on a GPU)")  # fmt: skip
    batches: list[int] = setting([1, 16], "batch sizes", parse=_ints)
    ks: list[int] = setting([0, 1, 4], "draft lengths", parse=_ints)
    prompt_len: int = setting(256, "context per request")
    steps: int = setting(12, "timed steps per point")
    out: str = setting("results/bench_step", "directory for JSON and PNG")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, StepSettings)


def main(namespace: argparse.Namespace) -> list[dict[str, Any]]:
    return run(settings.from_args(StepSettings, namespace))


def run(args: StepSettings) -> list[dict[str, Any]]:
    device, dtype = device_and_dtype(args.device, args.dtype)
    default = ["smollm2-135m", "llama-3.1-8b"] if device.type == "cuda" else ["smollm2-135m"]
    shapes = args.shapes.split(",") if args.shapes else default
    for shape in shapes:
        if shape not in SHAPES:
            raise SystemExit(f"adactl bench step: unknown shape {shape!r}: choose from {', '.join(SHAPES)}")
    if args.prompt_len < 1 or args.steps < 1:
        raise SystemExit("adactl bench step: --prompt-len and --steps must be at least 1")
    graphs = graphs_wanted(device)
    machine = describe(device, dtype)
    records: list[dict[str, Any]] = []
    freeze_heap()  # no full collection of the objects alive now inside a timed step
    with tqdm(total=len(shapes) * len(args.batches) * len(args.ks), desc="bench step", unit="point") as bar:
        for shape in shapes:
            records += measure(shape, args.batches, args.ks, args.prompt_len, args.steps, device, dtype, graphs, bar)
    summary = targets(records)
    out = Path(args.out)
    meta = {"machine": machine.to_dict(), "cuda_graphs": graphs, "prompt_len": args.prompt_len,
            "steps": args.steps, "targets": summary}  # fmt: skip
    write_json(out / "step.json", records, meta)
    plot(records, out / "step.png", f"engine step vs bare forward: {machine.label}, graphs {'on' if graphs else 'off'}")
    columns = ["shape", "batch", "k", "engine_ms", "engine_ms_median", "draft_ms", "verify_ms", "bare_eager_ms",
               "bare_graph_ms", "bare_median_ms", "engine_over_bare", "median_over_bare"]  # fmt: skip
    print(f"\n{machine.label}; CUDA graphs {'on' if graphs else 'off'}; context {args.prompt_len}")
    print(format_table(records, columns))
    print()
    print(format_table(summary, ["shape", "target", "value", "fastest", "bar", "met"]))
    print(f"\nwrote {out / 'step.json'} and {out / 'step.png'}")
    return records
