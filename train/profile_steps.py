"""Record step-time profiles of the engine: the data the step-time model is fitted on.

(Not train/profile.py: that name would shadow the standard library's `profile`, which torch
imports, for every script in train/.)

    python train/profile_steps.py                      # default target, draft + companion, CPU
    python train/profile_steps.py --batches 1,4,16 --reps 2 --out /tmp/profile.json
    python train/profile_steps.py --draft '' --max-k 0 --reps 12 --mixed 8 \
        --out models/estimators/profile_plain.json     # the target alone (streaming serves plain)

For each batch size, that many ShareGPT prompts (training split) are prefilled, then every
draft length 0..8 runs `--reps` steps (in a shuffled order), a third verifying whole drafts, a
third a random prefix per row (verify controllers cut drafts short) and a third with only a
few requests drafting (SLO-customised plans; the engine splits such verify forwards). Then
`--mixed` new requests join one at a time with a random prefill budget (16..512 tokens), and
their prefill chunks run in the same steps as the batch's decodes (what a streaming server
does all the time) for up to 8 steps each. Each step's shape
(`StepShape`) and its prefill, draft and verify seconds are written as JSON. At the largest
batch it also times what the controllers add per step (estimate + act of each acceptance
predictor) against that step's own time.

Take profiles on a quiet machine: anything else running shows up in every number.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from adactl.controllers import ConfidenceStop
from adactl.estimators import CompanionSignal, DraftConfidence, MovingAverage, OnlineLogistic, StepShape
from adactl.estimators.traces import TraceRecorder
from adactl.interface import ScheduleState, StepRecord, VerifyState
from adactl.runtime import Engine, SamplingParams, StepPlan
from adactl.runtime.device import describe, device_and_dtype, dtype_name
from adactl.runtime.models import SHIPPED_MODELS, load_pair, tiny_llama
from adactl.settings import DeviceSettings, add_arguments, device_environment

DEFAULT_OUT = SHIPPED_MODELS / "estimators" / "profile.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2")
    p.add_argument("--draft", default="draft", help="'' for none: the target alone, plain decoding")
    p.add_argument("--companion", default="companion", help="'' for none")
    add_arguments(p, DeviceSettings)
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--max-k", type=int, default=8)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--mixed", type=int, default=4, help="joining requests per batch size (prefill + decode steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--tiny", action="store_true", help="tiny random models and prompts (a smoke run)")
    args = p.parse_args(argv)
    device_environment(args)
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def load(args: argparse.Namespace) -> tuple[Engine, list[list[int]], dict]:
    if args.tiny:
        from adactl.runtime import FeatureDraft
        from adactl.runtime.feature_draft import WithCompanion

        device, dtype = device_and_dtype(args.device, args.dtype)
        target = tiny_llama(vocab_size=256).to(device, dtype)
        draft = WithCompanion(
            FeatureDraft.from_target(target, list(range(192)), 64, seed=1).eval(),
            FeatureDraft.from_target(target, list(range(0, 256, 2)), 32, seed=2).eval(),
        )
        g = torch.Generator().manual_seed(args.seed)
        n = max(args.batches) + args.mixed
        prompts = [torch.randint(1, 256, (int(k),), generator=g).tolist() for k in torch.randint(4, 40, (n,))]
        return Engine(target, draft), prompts, {"target": "tiny", "draft": "tiny+companion"}
    from adactl.workloads import built_apart, chat_prompts, read_sharegpt

    pair = load_pair(args.target, args.draft or None, (args.companion or None) if args.draft else None, args.device,
                     args.dtype)  # fmt: skip
    loaded = pair.target
    prompts = built_apart(lambda: chat_prompts(loaded.tokenizer, max(args.batches) + args.mixed, args.max_prompt_tokens,
                                               read_sharegpt()))  # fmt: skip (in a child: they would slow the steps)
    meta = {"target": args.target, "draft": args.draft, "companion": args.companion, "dtype": dtype_name(pair.dtype),
            "machine": describe(pair.device, pair.dtype).to_dict()}  # fmt: skip
    return Engine(loaded.model, pair.speculator(pair.companion is not None), loaded.tokenizer), prompts, meta


def overhead(drafts, steps_s: float, reps: int = 5) -> dict[str, float]:
    """Seconds of estimate + act per predictor on one step's drafts, and the ratio to the step."""
    state = VerifyState(time.perf_counter(), drafts)
    predictors = [DraftConfidence(), OnlineLogistic(), MovingAverage()]
    if drafts.companion_probs is not None:
        predictors.append(CompanionSignal())
    out: dict[str, float] = {"step_s": steps_s, "rows": len(drafts.request_ids), "k": int(drafts.draft_len.max())}
    for p in predictors:
        stop = ConfidenceStop(0.4, p)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            stop.act(state, p.estimate(state))
            best = min(best, time.perf_counter() - t0)
        out[f"{p.name}_s"] = best
        out[f"{p.name}_ratio"] = best / steps_s
    return out


def profile(args: argparse.Namespace) -> dict:
    engine, prompts, meta = load(args)
    rng = random.Random(args.seed)
    recorder = TraceRecorder()
    costs: dict[str, float] = {}
    total = sum(args.reps * (args.max_k + 1) + 8 * args.mixed for _ in args.batches)
    bar = tqdm(total=total, desc="profile steps", unit="step")
    for b in args.batches:
        ids = [engine.add_request(p, SamplingParams(max_new_tokens=4096, stop_on_eos=False)) for p in prompts[:b]]
        plan0 = StepPlan(draft_len=0, prefill_budget=512)
        while any(v.status != "running" for v in engine.requests()):
            drafts = engine.draft_step(plan0)
            outcome = engine.verify()
            state = ScheduleState(time.perf_counter(), tuple(engine.requests()), args.max_k, plan0)
            recorder.update(StepRecord(state, plan0, drafts, drafts.draft_len, outcome))
        ks = [k for k in range(args.max_k + 1) for _ in range(args.reps)]
        rng.shuffle(ks)
        for i, k in enumerate(ks):
            plan = StepPlan(draft_len=k, prefill_budget=0)
            if i % 3 == 2:  # a few requests draft k, the rest 0 or 1 (SLO-customised plans)
                few = rng.randint(1, max(1, b // 4))
                running = [v.request_id for v in engine.requests()]
                plan = StepPlan(draft_len={r: k if j < few else rng.randint(0, 1) for j, r in enumerate(running)},
                                prefill_budget=0)  # fmt: skip
            drafts = engine.draft_step(plan)
            cut = drafts.draft_len.clone()
            if i % 3 == 1:
                cut = torch.tensor([rng.randint(0, int(n)) for n in drafts.draft_len])
            outcome = engine.verify(cut)
            state = ScheduleState(time.perf_counter(), tuple(engine.requests()), args.max_k, plan)
            recorder.update(StepRecord(state, plan, drafts, cut, outcome))
            if b == max(args.batches) and k == args.max_k and k > 0 and not costs:
                costs = overhead(drafts, outcome.total_s)
            bar.update(1)
        for j in range(args.mixed):  # prefill chunks next to the batch's decodes
            plan = StepPlan(draft_len=0, prefill_budget=rng.choice([16, 32, 64, 128, 256, 512]))
            new = engine.add_request(prompts[-1 - j], SamplingParams(max_new_tokens=4096, stop_on_eos=False))
            for _ in range(8):
                drafts = engine.draft_step(plan)
                outcome = engine.verify()
                state = ScheduleState(time.perf_counter(), tuple(engine.requests()), args.max_k, plan)
                recorder.update(StepRecord(state, plan, drafts, drafts.draft_len, outcome))
                bar.update(1)
                if all(v.status == "running" for v in engine.requests()):
                    break
            engine.cancel(new)
        for rid in ids:
            engine.cancel(rid)
        engine.draft_step(StepPlan(draft_len=0, prefill_budget=0))
        engine.verify()
        engine.pop_finished()
    bar.close()
    seconds = recorder.step_seconds()
    return {
        "meta": {**meta, "batches": args.batches, "max_k": args.max_k, "reps": args.reps, "seed": args.seed},
        "steps": [asdict(s) | {"prefill_s": p, "draft_s": d, "verify_s": v} for s, (p, d, v) in zip(
            recorder.shapes, seconds.tolist())],
        "overhead": costs,
    }  # fmt: skip


def read_profile(path: str | Path) -> tuple[list[StepShape], list[list[float]], dict]:
    data = json.loads(Path(path).read_text())
    names = StepShape.names()
    shapes = [StepShape(**{n: s[n] for n in names if n in s}) for s in data["steps"]]
    seconds = [[s["prefill_s"], s["draft_s"], s["verify_s"]] for s in data["steps"]]
    return shapes, seconds, data


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    result = profile(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=0) + "\n")
    print(f"{len(result['steps'])} steps -> {out}")
    if result["overhead"]:
        print("estimate + act at the largest batch:", json.dumps(result["overhead"], indent=1))


if __name__ == "__main__":
    main()
