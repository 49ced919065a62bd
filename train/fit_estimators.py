"""Fit every estimator on engine traces and report how good each is.

    python train/fit_estimators.py            # default target, draft and companion
    python train/fit_estimators.py --tiny     # tiny random models (a smoke run, seconds)

1. Traces: the engine serves ShareGPT first turns in batches with a fixed draft length,
   verifying every draft, half the requests greedy and half sampled (`--temperature`).
   Training-split prompts fit the models; held-out prompts (record index % 20 == 0) judge them.
2. Acceptance predictors (draft confidence raw and calibrated, online logistic, companion
   signal, per-position moving average) are scored on the held-out trace in step order; the
   online ones predict each step before learning from it, as they would while serving.
   Scores: AUC, Brier, expected calibration error (10 bins), overall and greedy / sampled.
3. The step-time model is fitted on the profile from train/profile_steps.py (80% of the steps,
   shuffled) and scored by its mean absolute percentage error on the other 20%.
4. Deadline risk: the learned model is fitted on simulated streams, both it and the analytic
   one are scored by calibration by decile on other simulated streams.

Writes the fitted estimators (JSON; skops for the trees) and report.json + reliability.png
into `--out` (default models/estimators/).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adactl.controllers import FixedDraftLength
from adactl.estimators import (
    AnalyticRisk,
    CompanionSignal,
    DraftConfidence,
    IsotonicMap,
    LearnedRisk,
    MovingAverage,
    OnlineLogistic,
    StepTimeModel,
    TokensPerStep,
    auc,
    brier,
    expected_calibration_error,
)
from adactl.estimators.calibration import reliability_plot
from adactl.estimators.deadline_risk import simulate
from adactl.estimators.logistic import ByMode
from adactl.estimators.step_time import mape
from adactl.estimators.traces import AcceptanceRows, TraceRecorder
from adactl.loop import ControlLoop
from adactl.runtime import Engine, SamplingParams
from adactl.runtime.device import device_and_dtype
from adactl.runtime.models import SHIPPED_MODELS, load_pair, tiny_llama
from adactl.settings import DeviceSettings, add_arguments, device_environment

DEFAULT_OUT = SHIPPED_MODELS / "estimators"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2")
    p.add_argument("--draft", default="draft")
    p.add_argument("--companion", default="companion")
    add_arguments(p, DeviceSettings)
    p.add_argument("--train-prompts", type=int, default=64)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="requests served at once")
    p.add_argument("--k", type=int, default=6, help="draft length of the traces")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--temperature", type=float, default=0.7, help="of the sampled half of the requests")
    p.add_argument("--profile", default=str(DEFAULT_OUT / "profile.json"), help="from train/profile_steps.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--tiny", action="store_true")
    p.add_argument(
        "--only",
        choices=["all", "step_time"],
        default="all",
        help="step_time: refit only the step-time model from --profile (keeps the rest of report.json)",
    )
    p.add_argument(
        "--step-time-name",
        default="step_time",
        help="file stem of the fitted step-time model (step_time_plain: the target alone)",
    )
    args = p.parse_args(argv)
    device_environment(args)
    return args


# ------------------------------------------------------------------ traces
def load(args: argparse.Namespace) -> tuple[Any, Any, list[list[int]], list[list[int]]]:
    if args.tiny:
        from adactl.runtime import FeatureDraft
        from adactl.runtime.feature_draft import WithCompanion
        from adactl.runtime.models import perturbed_copy

        device, dtype = device_and_dtype(args.device, args.dtype)
        target = tiny_llama().to(device, dtype)
        # a feature draft needs training to agree with anything; a perturbed copy of the
        # target agrees about half the time, which is what a smoke run needs
        draft: Any = perturbed_copy(target, noise=0.03, seed=1)
        if args.companion:
            draft = WithCompanion(
                FeatureDraft.from_target(target, list(range(128)), 64, seed=1).eval(),
                FeatureDraft.from_target(target, list(range(128)), 32, seed=2).eval(),
            )
        g = torch.Generator().manual_seed(args.seed)
        n = args.train_prompts + args.eval_prompts
        prompts = [torch.randint(1, 128, (int(k),), generator=g).tolist() for k in torch.randint(2, 16, (n,))]
        return target, draft, prompts[: args.train_prompts], prompts[args.train_prompts :]
    from adactl.workloads import chat_prompts, read_sharegpt

    pair = load_pair(args.target, args.draft, args.companion or None, args.device, args.dtype)
    loaded, draft = pair.target, pair.speculator(pair.companion is not None)
    data = read_sharegpt()
    train = chat_prompts(loaded.tokenizer, args.train_prompts, args.max_prompt_tokens, data)
    held_out = chat_prompts(loaded.tokenizer, args.eval_prompts, args.max_prompt_tokens, data, held_out=True)
    return loaded.model, draft, train, held_out


def record(target: Any, draft: Any, prompts: list[list[int]], args: argparse.Namespace, desc: str) -> TraceRecorder:
    """Serve `prompts` (at most `--batch` at once) drafting k, verifying all; the trace."""
    recorder = TraceRecorder()
    engine = Engine(target, draft)
    loop = ControlLoop(engine, schedule=FixedDraftLength(args.k), estimators=[recorder], max_draft_len=args.k)
    queue = list(enumerate(prompts))
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), desc=f"trace {desc}", unit="request")
    while queue or engine.has_unfinished():
        running = len(engine.requests())
        while queue and running < args.batch:
            i, p = queue.pop(0)
            temp = 0.0 if i % 2 == 0 else args.temperature
            rid = engine.add_request(p, SamplingParams(args.max_new_tokens, temperature=temp, seed=args.seed + i))
            recorder.group_of[rid] = i
            running += 1
        before = len(loop.results)
        loop.step()
        bar.update(len(loop.results) - before)
    bar.close()
    return recorder


# -------------------------------------------------------------- acceptance
def scores(p: torch.Tensor, y: torch.Tensor, greedy: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {
        "auc": auc(p, y),
        "brier": brier(p, y),
        "ece": expected_calibration_error(p, y),
        "n": len(y),
        "base_rate": float(y.mean()),
    }
    for name, m in (("greedy", greedy), ("sampled", ~greedy)):
        if int(m.sum()) > 10:
            out[name] = {"auc": auc(p[m], y[m]), "ece": expected_calibration_error(p[m], y[m]), "n": int(m.sum())}
    return out


def replay_online(model: ByMode, x: torch.Tensor, rows: AcceptanceRows) -> torch.Tensor:
    """Predict each step's positions, then learn from them (serving order)."""
    out = torch.zeros(len(rows.label))
    for s in torch.unique(rows.step):
        m = rows.step == s
        out[m] = model.predict(x[m], rows.greedy[m])
        model.partial_fit(x[m], rows.label[m], rows.greedy[m])
    return out


def replay_moving_average(ma: MovingAverage, rows: AcceptanceRows) -> torch.Tensor:
    out = torch.zeros(len(rows.label))
    for s in torch.unique(rows.step):
        m = rows.step == s
        pos = rows.position[m].clamp(max=len(ma.mean) - 1)
        out[m] = ma.mean[pos]
        for j in torch.unique(pos):
            ma.observe(int(j), rows.label[m][pos == j])
    return out


def fit_acceptance(train: AcceptanceRows, test: AcceptanceRows, out: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    q_train, q_test = train.draft_x[:, 0], test.draft_x[:, 0]
    conf = DraftConfidence(IsotonicMap.fit(q_train, train.label))
    conf.save(out / "confidence.json")
    preds = {"confidence (raw)": q_test, "confidence (calibrated)": conf.calibration(q_test)}  # type: ignore[misc]

    logistic = OnlineLogistic(ByMode(train.draft_x.shape[1]).fit(train.draft_x, train.label, train.greedy))
    logistic.save(out / "logistic.json")
    preds["logistic (online)"] = replay_online(ByMode.from_dict(logistic.model.to_dict()), test.draft_x, test)

    if train.companion_x is not None and test.companion_x is not None:
        model = ByMode(train.companion_x.shape[1]).fit(train.companion_x, train.label, train.greedy)
        raw = model.predict(train.companion_x, train.greedy)
        companion = CompanionSignal(model, IsotonicMap.fit(raw, train.label))
        companion.save(out / "companion.json")
        test_raw = model.predict(test.companion_x, test.greedy)
        preds["companion signal"] = companion.calibration(test_raw)  # type: ignore[misc]
        report["companion_weights_greedy"] = dict(zip(CompanionSignal.features, model.greedy.w.tolist()))

    ma = MovingAverage()
    replay_moving_average(ma, train)
    ma.save(out / "moving_average.json")
    preds["moving average"] = replay_moving_average(MovingAverage.from_dict(ma.to_dict()), test)

    for name, p in preds.items():
        report[name] = scores(p, test.label, test.greedy)
        curves[name] = (p, test.label)
    reliability_plot(curves, out / "reliability.png", "Acceptance predictors, held-out ShareGPT trace")
    report["acceptance_by_position"] = [
        float(test.label[test.position == j].mean()) for j in range(int(test.position.max()) + 1)
    ]
    return report


# --------------------------------------------------------------- step time
def fit_step_time(profile: Path, out: Path, seed: int, name: str = "step_time") -> dict[str, Any]:
    if not profile.is_file():
        return {"skipped": f"no profile at {profile}: run python train/profile_steps.py"}
    import importlib.util

    spec = importlib.util.spec_from_file_location("adactl_profile", Path(__file__).parent / "profile_steps.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shapes, seconds, data = mod.read_profile(profile)
    steps = [i for i, s in enumerate(shapes) if s.rows > 0 or s.prefill_tokens > 0]
    order = steps[:]
    random.Random(seed).shuffle(order)
    cut = int(0.8 * len(order))
    train, test = order[:cut], order[cut:]
    y = np.asarray(seconds)
    model = StepTimeModel(seed=seed).fit([shapes[i] for i in train], y[train])
    pred = model.predict([shapes[i] for i in test])
    true = y[test].sum(1)
    model.fit([shapes[i] for i in steps], y[steps])  # the saved model uses every step
    model.save(out / f"{name}.skops")
    by_batch: dict[int, list[float]] = {}
    for i, p, t in zip(test, pred, true):
        by_batch.setdefault(shapes[i].rows, []).append(abs(p - t) / t)
    return {
        "mape": mape(pred, true),
        "mape_by_rows": {b: float(np.mean(v)) for b, v in sorted(by_batch.items())},
        "train_steps": len(train),
        "test_steps": len(test),
        "profile": data["meta"],
        "overhead": data.get("overhead", {}),
    }


# ----------------------------------------------------------- deadline risk
def fit_deadline_risk(out: Path, seed: int, n: int = 40_000) -> dict[str, Any]:
    train_s, train_y = simulate(n, seed=seed)
    test_s, test_y = simulate(n, seed=seed + 1)
    learned = LearnedRisk().fit(train_s, train_y)
    (out / "deadline_risk.json").write_text(json.dumps({"kind": "learned", **learned.to_dict()}) + "\n")
    report: dict[str, Any] = {"miss_rate": float(test_y.float().mean())}
    for name, model in (("analytic", AnalyticRisk()), ("learned", learned)):
        p = model.estimate(test_s)
        edges = torch.quantile(p, torch.linspace(0, 1, 11))
        which = torch.bucketize(p, edges[1:-1])
        deciles = [
            {"decile": d, "forecast": float(p[which == d].mean()), "observed": float(test_y[which == d].float().mean())}
            for d in range(10)
            if bool((which == d).any())
        ]
        report[name] = {"auc": auc(p, test_y), "ece": expected_calibration_error(p, test_y), "deciles": deciles}
    return report


# -------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only == "step_time":
        path = out / "report.json"
        report = json.loads(path.read_text()) if path.is_file() else {"args": vars(args)}
        report[args.step_time_name] = fit_step_time(Path(args.profile), out, args.seed, args.step_time_name)
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        fitted = report[args.step_time_name]
        print(args.step_time_name, json.dumps({k: fitted.get(k) for k in ("mape", "mape_by_rows")}))
        return report
    target, draft, train_prompts, eval_prompts = load(args)
    train_trace = record(target, draft, train_prompts, args, "train")
    test_trace = record(target, draft, eval_prompts, args, "held-out")
    from adactl.runtime.device import describe

    param = next(target.parameters())
    report: dict[str, Any] = {"args": vars(args), "machine": describe(param.device, param.dtype).to_dict()}
    report["acceptance"] = fit_acceptance(train_trace.acceptance(), test_trace.acceptance(), out)
    train_rows = train_trace.acceptance()
    alpha = [float(train_rows.label[train_rows.position == j].mean()) for j in range(args.k)]
    tokens = TokensPerStep.from_alpha(alpha)  # mean tokens per step by draft length, greedy and sampled
    tokens.save(out / "tokens_per_step.json")
    report["tokens_per_step"] = tokens.mean().tolist()[: args.k + 1]
    report["step_time"] = fit_step_time(Path(args.profile), out, args.seed)
    report["deadline_risk"] = fit_deadline_risk(out, args.seed)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    k = report["args"]["k"]
    print(f"\n{'acceptance predictor':26} {'AUC':>6} {'Brier':>6} {'ECE':>6}  (held-out trace, k = {k})")
    for name, s in report["acceptance"].items():
        if isinstance(s, dict) and "auc" in s:
            print(f"{name:26} {s['auc']:6.3f} {s['brier']:6.3f} {s['ece']:6.3f}")
    st = report["step_time"]
    print("step time:", f"MAPE {st['mape']:.3f}" if "mape" in st else st.get("skipped"))
    for name in ("analytic", "learned"):
        r = report["deadline_risk"][name]
        print(f"deadline risk ({name}): AUC {r['auc']:.3f}, ECE {r['ece']:.3f}")


if __name__ == "__main__":
    main()
