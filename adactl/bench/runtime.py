"""`adactl bench runtime`: the engine next to Hugging Face `generate`, side by side in one process.

Configurations, each on the same greedy prompts (so every configuration produces the same
tokens; the engine's greedy output equals generate's):
- `hf_generate`: `model.generate` on a left-padded static batch;
- `engine_plain`: the engine without a draft (speculation off);
- `engine_k4`: the engine with a fixed draft length of 4;
- `hf_assisted` (batch 1 only; transformers supports no other): `generate(assistant_model=)`
  with transformers' defaults (up to 20 draft tokens, stop below 0.4 confidence), and
  `hf_assisted_k4` with 4 draft tokens always (the like-for-like comparison with engine_k4).

Reported per configuration: tokens/s (generated tokens, up to EOS, per wall second), mean
accepted length (tokens per verify step, bonus included), mean step time (wall time over
decode steps, prefill included), peak resident memory over the process's level before the
run, and KV bytes per real cached token (target model), averaged over decode steps: what
padding, holes, finished rows and spare capacity cost. Every batch size runs in interleaved
rounds (`--rounds`); a table row is a configuration's median round, a ratio the median of the
ratios within rounds (paired runs close in time), with their min and max.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from adactl import settings
from adactl.bench.common import PeakMemory, format_table, release_freed_memory, save_figure, write_json
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
from adactl.runtime.models import perturbed_copy, tiny_llama
from adactl.settings import DeviceSettings, PairSettings, RunSettings, ints, setting

DEFAULT_DRAFT = "smollm2@layers=4"
DRAFT_NOTE = (
    "stand-in draft: the target's first 4 layers (early exit), because transformers' assisted "
    "generation needs a plain causal LM; it agrees with the target rarely, so speculation loses "
    "here (the shipped feature draft: adactl bench draft)"
)


@dataclass(frozen=True)
class Workload:
    """Prompts (token ids) and decoding length shared by every configuration."""

    prompts: list[list[int]]
    max_new_tokens: int
    eos_id: int


def run_engine(
    target: PreTrainedModel, draft: PreTrainedModel | None, work: Workload, batch: int, k: int, bar: tqdm
) -> dict[str, Any]:
    """Run the engine on the first `batch` prompts at once (batch 1: one prompt after another)."""
    groups = _groups(work.prompts, batch)
    engine = Engine(target, draft, config=EngineConfig(max_batch_size=max(batch, 1)))
    engine.eos_ids = {work.eos_id}
    sampling = SamplingParams(max_new_tokens=work.max_new_tokens)
    tokens = steps = row_steps = decode_tokens = 0
    kv_ratios: list[float] = []
    with PeakMemory() as mem:
        start = time.perf_counter()
        for group in groups:
            for p in group:
                engine.add_request(p, sampling)
            # the whole batch is prefilled in its first step, as generate does
            plan = StepPlan(draft_len=k, prefill_budget=sum(len(p) for p in group))
            while engine.has_unfinished():
                out = engine.step(plan)
                steps += 1
                row_steps += len(out.request_ids)
                decode_tokens += sum(len(out.emitted[r]) for r in out.request_ids)
                if engine.cached_tokens():  # per target token, as for generate
                    kv_ratios.append(engine.kv_bytes(include_draft=False) / engine.cached_tokens())
                bar.update(out.tokens_emitted)
            tokens += sum(len(r.output_ids) for r in engine.pop_finished())
        wall = time.perf_counter() - start
    return _record(
        config="engine_plain" if draft is None else f"engine_k{k}",
        batch=batch,
        tokens=tokens,
        wall=wall,
        steps=steps,
        mem=mem,
        accepted_len=decode_tokens / max(row_steps, 1),
        kv_per_token=sum(kv_ratios) / max(len(kv_ratios), 1),
    )


def run_generate(
    target: PreTrainedModel,
    work: Workload,
    batch: int,
    bar: tqdm,
    assistant: PreTrainedModel | None = None,
    config: str = "hf_generate",
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """`model.generate` on left-padded batches of the same prompts, greedy."""
    tokens = steps = 0
    kv_ratios: list[float] = []
    with PeakMemory() as mem:
        start = time.perf_counter()
        for group in _groups(work.prompts, batch):
            width = max(len(p) for p in group)
            device = next(target.parameters()).device
            ids = torch.tensor([[work.eos_id] * (width - len(p)) + p for p in group], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
            with torch.inference_mode():
                out = target.generate(  # type: ignore[operator]  # generate is decorated in transformers
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=work.max_new_tokens,
                    do_sample=False,
                    pad_token_id=work.eos_id,
                    eos_token_id=work.eos_id,
                    assistant_model=assistant,
                    return_dict_in_generate=True,
                    **generate_kwargs,
                )
            generated = [_until_eos(row[width:].tolist(), work.eos_id) for row in out.sequences]
            tokens += sum(len(g) for g in generated)
            steps += out.sequences.shape[1] - width
            bar.update(sum(len(g) for g in generated))
            cache = out.past_key_values
            if cache is not None and assistant is None:
                kv_ratios += _generate_kv_ratios(cache, group, generated, width)
        wall = time.perf_counter() - start
    return _record(
        config=config,
        batch=batch,
        tokens=tokens,
        wall=wall,
        steps=steps,
        mem=mem,
        accepted_len=1.0 if assistant is None else None,
        kv_per_token=sum(kv_ratios) / len(kv_ratios) if kv_ratios else None,
    )


def _generate_kv_ratios(cache: Any, group: list[list[int]], generated: list[list[int]], width: int) -> list[float]:
    """KV bytes per real cached token after each decode step of `generate`.

    Its `DynamicCache` is exactly `[B, H, width + s, D]` per layer after step s (left padding
    and finished rows included), so the byte count at every step follows from the final one.
    """
    final_cols = cache.layers[0].keys.shape[2]
    bytes_per_col = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / final_cols
    ratios = []
    for s in range(1, final_cols - width + 1):
        real = sum(len(p) + min(s, len(g)) for p, g in zip(group, generated))
        ratios.append(bytes_per_col * (width + s) / real)
    return ratios


def _groups(prompts: list[list[int]], batch: int) -> list[list[list[int]]]:
    if batch == 1:
        return [[p] for p in prompts[:_BATCH1_PROMPTS]]
    return [prompts[:batch]]


_BATCH1_PROMPTS = 2  # per round; batch-1 runs are sequential, so this sets their length


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _record(
    config: str,
    batch: int,
    tokens: int,
    wall: float,
    steps: int,
    mem: PeakMemory,
    accepted_len: float | None,
    kv_per_token: float | None,
) -> dict[str, Any]:
    return {
        "config": config,
        "batch_size": batch,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "mean_accepted_len": accepted_len,
        "step_ms": 1000 * wall / max(steps, 1),
        "peak_mem_mb": mem.peak_mb,
        "kv_bytes_per_token": kv_per_token,
    }


_CONFIG_ORDER = ["hf_generate", "engine_plain", "engine_k4", "hf_assisted", "hf_assisted_k4"]


def _run(
    config: str, batch: int, target: PreTrainedModel, draft: PreTrainedModel, work: Workload, bar: tqdm
) -> dict[str, Any]:
    if config == "hf_generate":
        return run_generate(target, work, batch, bar)
    if config == "engine_plain":
        return run_engine(target, None, work, batch, 0, bar)
    if config == "engine_k4":
        return run_engine(target, draft, work, batch, 4, bar)
    if config == "hf_assisted":  # transformers' defaults: up to 20 tokens, stop below 0.4 confidence
        return run_generate(target, work, 1, bar, assistant=draft, config=config)
    return run_generate(  # hf_assisted_k4: 4 draft tokens every step, like engine_k4
        target,
        work,
        1,
        bar,
        assistant=draft,
        config=config,
        num_assistant_tokens=4,
        num_assistant_tokens_schedule="constant",
        assistant_confidence_threshold=0.0,
    )


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


_COMPARISONS = [  # (numerator, denominator, metric, batch sizes or None for all)
    ("engine_plain", "hf_generate", "tokens_per_s", None),
    ("engine_k4", "engine_plain", "tokens_per_s", None),
    ("engine_k4", "hf_assisted", "tokens_per_s", (1,)),
    ("engine_k4", "hf_assisted_k4", "tokens_per_s", (1,)),
    ("engine_plain", "hf_generate", "peak_mem_mb", None),
    ("engine_plain", "hf_generate", "kv_bytes_per_token", None),
]


def add_ratios(runs: dict[tuple[str, int], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The ratios the issue asks for. Each is the median over rounds of the ratio *within* a
    round (paired runs, close in time), which cancels the machine's slow drifts."""
    ratios = []
    for a, b, key, batches in _COMPARISONS:
        for batch in sorted({bs for _, bs in runs}):
            if (batches is not None and batch not in batches) or (a, batch) not in runs or (b, batch) not in runs:
                continue
            pairs = [
                ra[key] / rb[key]
                for ra, rb in zip(runs[(a, batch)], runs[(b, batch)])
                if ra.get(key) is not None and rb.get(key)
            ]
            ratios.append(
                {
                    "batch_size": batch,
                    "metric": key,
                    "compare": f"{a} / {b}",
                    "ratio": statistics.median(pairs) if pairs else None,
                    "min": min(pairs) if pairs else None,
                    "max": max(pairs) if pairs else None,
                }
            )
    return ratios


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in records))
    batches = sorted({r["batch_size"] for r in records})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(configs)
    panels = ((axes[0], "tokens_per_s", "generated tokens / s"), (axes[1], "peak_mem_mb", "peak RSS rise (MB)"))
    for ax, key, label in panels:
        for i, c in enumerate(configs):
            xs, ys = [], []
            for j, b in enumerate(batches):
                r = next((r for r in records if r["config"] == c and r["batch_size"] == b), None)
                if r is not None:
                    xs.append(j + i * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=c)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path, title)


def _load(args: RuntimeSettings) -> tuple[PreTrainedModel, PreTrainedModel, Workload, dict[str, Any]]:
    from adactl.runtime.device import describe, device_and_dtype
    from adactl.runtime.models import load_pair

    device, dtype = device_and_dtype(args.device, args.dtype)  # before anything loads
    machine = describe(device, dtype).to_dict()
    if args.tiny:
        target = tiny_llama(vocab_size=512, hidden_size=128, num_layers=4, seed=0, max_positions=1024).to(device, dtype)
        draft = perturbed_copy(target, noise=0.03, seed=1)
        gen = torch.Generator().manual_seed(args.seed)
        n = max(args.batch_sizes)
        lengths = torch.randint(8, 64, (n,), generator=gen).tolist()
        prompts = [torch.randint(1, 512, (m,), generator=gen).tolist() for m in lengths]
        meta: dict[str, Any] = {
            "target": "tiny random Llama",
            "draft": "perturbed copy of the target",
            "workload": "random prompts",
            "machine": machine,
        }
        return target, draft, Workload(prompts, args.max_new_tokens, 0), meta
    from adactl.workloads import built_apart, chat_prompts, read_sharegpt

    # the default stand-in draft is the first 4 layers of whatever target is asked for
    draft = f"{args.target}@layers=4" if args.draft == DEFAULT_DRAFT and args.target != "smollm2" else args.draft
    pair = load_pair(args.target, draft, None, device, dtype)
    target_m = pair.target

    def build() -> tuple[int, int, list[list[int]]]:  # in a child: built here they slow this process's steps
        data = read_sharegpt()
        prompts = chat_prompts(target_m.tokenizer, max(args.batch_sizes), args.max_prompt_tokens, data)
        return len(data.records), data.skipped_tail_bytes, prompts

    records, skipped, prompts = built_apart(build)
    print(f"ShareGPT: read {records} complete records; skipped the cut-off tail ({skipped} bytes)")
    eos = int(target_m.tokenizer.eos_token_id)
    meta = {
        "target": args.target,
        "draft": draft,
        "draft_note": DRAFT_NOTE if args.draft == DEFAULT_DRAFT else "",
        "workload": f"ShareGPT V3 first user turns (<= {args.max_prompt_tokens} tokens), chat template",
        "sharegpt_records_read": records,
        "machine": machine,
    }
    return target_m.model, pair.draft, Workload(prompts, args.max_new_tokens, eos), meta  # type: ignore[return-value]


def main(namespace: argparse.Namespace) -> list[dict[str, Any]]:
    return run(settings.from_args(RuntimeSettings, namespace))


def run(args: RuntimeSettings) -> list[dict[str, Any]]:
    torch.manual_seed(args.seed)
    target, draft, work, meta = _load(args)
    freeze_heap()  # no full collection over the loaded models' objects inside a timed run
    meta.update({"max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(), "seed": args.seed})
    # the machine is noisy (+-10-20% from run to run): each batch size runs its configurations
    # in interleaved rounds, the order rotated each round; tables show each configuration's
    # median round, ratios the median of within-round ratios
    plan: list[tuple[int, str, int]] = []
    for b in args.batch_sizes:
        configs = ["hf_generate", "engine_plain", "engine_k4"] + (["hf_assisted", "hf_assisted_k4"] if b == 1 else [])
        configs = [c for c in configs if args.configs is None or c in args.configs]
        for k in range(args.rounds):
            plan += [(k, configs[(i + k) % len(configs)], b) for i in range(len(configs))]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tqdm(total=len(plan), desc="runs", position=0) as outer:
        for k, config, b in plan:
            with tqdm(desc=f"{config} b={b} round {k + 1} tokens", position=1, leave=False) as bar:
                release_freed_memory()
                runs.setdefault((config, b), []).append(_run(config, b, target, draft, work, bar))
            outer.update(1)
    records = [_median_run(rs) | {"rounds": len(rs)} for rs in runs.values()]
    for rs in runs.values():  # plan order is round-major, so runs[...] is in round order
        assert len(rs) == args.rounds
    records.sort(key=lambda r: (args.batch_sizes.index(r["batch_size"]), _CONFIG_ORDER.index(r["config"])))
    ratios = add_ratios(runs)
    out = Path(args.out)
    all_runs = [r | {"round": k} for rs in runs.values() for k, r in enumerate(rs)]
    write_json(out / "runtime.json", records, {**meta, "ratios": ratios, "rounds": all_runs})
    plot(records, out / "runtime.png",
         f"adactl bench runtime: {meta['target']} (draft: {meta['draft']}), {meta['machine']['label']}")  # fmt: skip
    columns = [
        "config",
        "batch_size",
        "tokens_per_s",
        "mean_accepted_len",
        "step_ms",
        "peak_mem_mb",
        "kv_bytes_per_token",
    ]
    print(format_table(records, columns))
    print()
    print(format_table(ratios, ["batch_size", "metric", "compare", "ratio", "min", "max"]))
    if meta.get("draft_note"):
        print(f"\nNote: {meta['draft_note']}")
    print(f"\nwrote {out / 'runtime.json'} and {out / 'runtime.png'}")
    return records


@dataclass(frozen=True)
class RuntimeSettings(PairSettings, RunSettings, DeviceSettings):
    """`adactl bench runtime`."""

    draft: str = setting(DEFAULT_DRAFT, "a plain causal LM sharing the target's tokenizer (transformers' assisted "
                         "generation needs one); default: the target's first 4 layers")  # fmt: skip
    batch_sizes: list[int] = setting([1, 16, 64], "batch sizes, comma-separated", parse=ints)
    max_new_tokens: int = setting(96, "tokens generated per request")
    max_prompt_tokens: int = setting(256, "prompts are clipped to this")
    rounds: int = setting(3, "interleaved rounds per batch size (medians kept)")
    configs: list[str] | None = setting(None, f"configurations, comma-separated (default all: "
                                        f"{','.join(_CONFIG_ORDER)})", parse=lambda s: s.split(","))  # fmt: skip
    seed: int = setting(0, "seed of the tiny models' prompts")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, RuntimeSettings)
