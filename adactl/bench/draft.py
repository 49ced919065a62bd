"""`adactl bench draft`: how good the default draft is for the default target, at batch 1 (on `--device`).

For each dataset (held-out ShareGPT first turns; HumanEval problems as chat requests), every
prompt runs greedy through the engine without speculation and with each fixed draft length in
`--ks`, the configurations interleaved prompt by prompt (order rotated) so that machine drift
hits all of them alike. Reported per dataset:
- `greedy_acceptance`: per-token argmax agreement on the target's own output (the acceptance
  rate of one-token drafts; the context is always what the target generated);
- `mean_accepted_len_k4`: tokens emitted per step drafting 4 (bonus token included);
- `acceptance_by_position_k4`: P(position j accepted | j - 1 accepted), j = 1..4;
- `draft_cost_ratio`: one draft token's time (draft time of the k = 4 steps / 4, the catch-up
  forward and sampling included) / one plain target step's time, both measured in the engine;
- `speedup_bs1`: tokens/s of the best fixed draft length / tokens/s without speculation.
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

from adactl import settings
from adactl.bench.common import format_table, save_figure, write_json
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan
from adactl.runtime.device import describe, device_and_dtype, dtype_name
from adactl.runtime.models import load_pair, tiny_llama
from adactl.settings import DeviceSettings, PairSettings, RunSettings, ints, setting

SUMMARY = ["dataset", "greedy_acceptance", "mean_accepted_len_k4", "draft_cost_ratio", "speedup_bs1", "best_k"]


def run_prompt(engine: Engine, prompt: list[int], k: int, max_new_tokens: int) -> dict[str, Any]:
    """One greedy request alone; per-step counts and times."""
    engine.add_request(prompt, SamplingParams(max_new_tokens=max_new_tokens))
    steps: list[tuple[int, int, int, float, float]] = []  # drafted, accepted, emitted, draft_s, verify_s
    start = time.perf_counter()
    first = True
    while engine.has_unfinished():
        out = engine.step(StepPlan(draft_len=k, prefill_budget=len(prompt)))
        if first:  # the prefill step emits the first token; it is not a decode step
            first = False
            continue
        if out.request_ids:
            rid = out.request_ids[0]
            steps.append(
                (int(out.drafted[0]), int(out.accepted[0]), len(out.emitted.get(rid, [])), out.draft_s, out.verify_s)
            )
    wall = time.perf_counter() - start
    (result,) = engine.pop_finished()
    return {"tokens": len(result.output_ids), "wall_s": wall, "steps": steps}


def summarise(dataset: str, runs: dict[int, list[dict[str, Any]]], ks: list[int]) -> tuple[dict, list[dict]]:
    rows = []
    speed = {}
    for k in [0, *ks]:
        tokens = sum(r["tokens"] for r in runs[k])
        wall = sum(r["wall_s"] for r in runs[k])
        steps = [s for r in runs[k] for s in r["steps"]]
        full = [s for s in steps if s[0] == k] if k else steps
        speed[k] = tokens / wall
        rows.append(
            {
                "dataset": dataset,
                "config": "plain" if k == 0 else f"k={k}",
                "tokens_per_s": tokens / wall,
                "mean_accepted_len": statistics.fmean(s[2] for s in full) if full else None,
                "acceptance": sum(s[1] for s in full) / max(sum(s[0] for s in full), 1) if k else None,
                "step_ms": 1000 * wall / max(len(steps), 1),
            }
        )
    target_step = statistics.median(s[4] for r in runs[0] for s in r["steps"])
    k4 = [s for r in runs.get(4, []) for s in r["steps"] if s[0] == 4]
    by_position = []
    for j in range(1, 5):
        reached = sum(1 for s in k4 if s[1] >= j - 1)
        by_position.append(sum(1 for s in k4 if s[1] >= j) / max(reached, 1))
    k1 = [s for r in runs.get(1, []) for s in r["steps"] if s[0] == 1]
    best = max(ks, key=lambda k: speed[k])
    summary = {
        "dataset": dataset,
        "greedy_acceptance": sum(s[1] for s in k1) / max(len(k1), 1) if k1 else None,
        "mean_accepted_len_k4": statistics.fmean(s[2] for s in k4) if k4 else None,
        "acceptance_by_position_k4": by_position if k4 else None,
        "draft_cost_ratio": statistics.median(s[3] / 4 for s in k4) / target_step if k4 else None,
        "target_step_ms": 1000 * target_step,
        "speedup_bs1": speed[best] / speed[0],
        "best_k": best,
        "prompts": len(runs[0]),
        "tokens_plain": sum(r["tokens"] for r in runs[0]),
    }
    return summary, rows


def plot(summaries: list[dict], rows: list[dict], ks: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for s in summaries:
        plain = next(r for r in rows if r["dataset"] == s["dataset"] and r["config"] == "plain")["tokens_per_s"]
        ys = [
            next(r for r in rows if r["dataset"] == s["dataset"] and r["config"] == f"k={k}")["tokens_per_s"] / plain
            for k in ks
        ]
        axes[0].plot(ks, ys, marker="o", label=s["dataset"])
        if s["acceptance_by_position_k4"]:
            axes[1].plot(range(1, 5), s["acceptance_by_position_k4"], marker="o", label=s["dataset"])
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_xlabel("fixed draft length k")
    axes[0].set_ylabel("tokens/s vs no speculation (batch 1)")
    axes[1].set_xlabel("draft position j (k = 4)")
    axes[1].set_ylabel("P(accept j | accepted j - 1)")
    axes[1].set_ylim(0, 1)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, title)


def _load(args: DraftSettings) -> tuple[Any, Any, dict[str, list[list[int]]], dict[str, Any]]:
    device, dtype = device_and_dtype(args.device, args.dtype)  # before anything loads
    if args.tiny:
        from adactl.runtime import FeatureDraft

        target = tiny_llama(vocab_size=256).to(device, dtype)
        draft = FeatureDraft.from_target(target, list(range(192)), intermediate_size=64).eval()
        gen = torch.Generator().manual_seed(args.seed)
        prompts = [
            torch.randint(1, 256, (int(n),), generator=gen).tolist() for n in torch.randint(4, 24, (args.prompts,))
        ]
        meta = {"target": "tiny random Llama", "draft": "untrained feature draft",
                "machine": describe(device, dtype).to_dict()}  # fmt: skip
        return target, draft, {"random": prompts}, meta
    from adactl.workloads import built_apart, chat_prompts, humaneval_prompts, read_sharegpt

    pair = load_pair(args.target, args.draft, None, device, dtype)
    target, draft = pair.target, pair.draft
    datasets: dict[str, list[list[int]]] = {}
    for name in args.datasets:
        if name == "sharegpt":
            datasets[name] = built_apart(lambda: chat_prompts(target.tokenizer, args.prompts, args.max_prompt_tokens,
                                                              read_sharegpt(), held_out=True))  # fmt: skip
        elif name == "humaneval":
            datasets[name] = humaneval_prompts(target.tokenizer, args.prompts, args.max_prompt_tokens)
        else:
            raise SystemExit(f"unknown dataset {name!r}: choose from sharegpt, humaneval")
    meta = {
        "target": args.target,
        "draft": args.draft,
        "dtype": dtype_name(dtype),
        "machine": describe(device, dtype).to_dict(),
        "workloads": "held-out ShareGPT first user turns (record index % 20 == 0); HumanEval problems as chat requests",
    }
    return target.model, draft, datasets, meta


def main(namespace: argparse.Namespace) -> list[dict[str, Any]]:
    return run(settings.from_args(DraftSettings, namespace))


def run(args: DraftSettings) -> list[dict[str, Any]]:
    torch.manual_seed(args.seed)
    target, draft, datasets, meta = _load(args)
    engine = Engine(target, draft, config=EngineConfig(max_batch_size=1))
    plain_engine = Engine(target, None, config=EngineConfig(max_batch_size=1))
    configs = [0, *args.ks]
    summaries: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    total = sum(len(p) for p in datasets.values()) * len(configs)
    with tqdm(total=total, desc="runs (prompt x config)") as bar:
        for name, prompts in datasets.items():
            runs: dict[int, list[dict[str, Any]]] = {k: [] for k in configs}
            for i, prompt in enumerate(prompts):
                for j in range(len(configs)):
                    k = configs[(i + j) % len(configs)]
                    runs[k].append(run_prompt(plain_engine if k == 0 else engine, prompt, k, args.max_new_tokens))
                    bar.update(1)
            summary, dataset_rows = summarise(name, runs, args.ks)
            summaries.append(summary)
            rows += dataset_rows
    out = Path(args.out)
    meta.update(
        {"max_new_tokens": args.max_new_tokens, "ks": args.ks, "torch_threads": torch.get_num_threads(), "rows": rows}
    )
    write_json(out / "draft.json", summaries, meta)
    title = f"adactl bench draft: {meta['target']} + {meta['draft']}, {meta['machine']['label']}"
    plot(summaries, rows, args.ks, out / "draft.png", title)
    print(format_table(rows, ["dataset", "config", "tokens_per_s", "mean_accepted_len", "acceptance", "step_ms"]))
    print()
    print(format_table(summaries, SUMMARY))
    print(f"\nwrote {out / 'draft.json'} and {out / 'draft.png'}")
    return summaries


@dataclass(frozen=True)
class DraftSettings(PairSettings, RunSettings, DeviceSettings):
    """`adactl bench draft`."""

    datasets: list[str] = setting(["sharegpt", "humaneval"], "comma-separated", parse=lambda s: s.split(","))
    prompts: int = setting(10, "prompts per dataset")
    ks: list[int] = setting([1, 2, 3, 4, 5, 6], "draft lengths, comma-separated", parse=ints)
    max_new_tokens: int = setting(128, "tokens generated per prompt")
    max_prompt_tokens: int = setting(384, "prompts are clipped to this")
    seed: int = setting(0, "seed of the tiny models' prompts")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, DraftSettings)
