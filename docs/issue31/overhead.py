"""Issue 31's CPU target: the engine's own overhead per step (a step's time minus the time
spent inside its model forwards, both measured in the same steps), for plain decoding and a
chain of k = 4 at batch 1 and 16 on the `tiny` shape of `adactl bench step` (a 2-layer model,
so host work dominates), for this tree and another commit's, side by side in one run.

    PYTHONPATH=. python docs/issue31/overhead.py                   # this tree
    PYTHONPATH=. python docs/issue31/overhead.py --against 40b5b72 # and that commit's

Each tree runs in its own process (the other commit from a git worktree under /tmp, its
`runtime`, `estimators`, `envs` and `models` linked into `adactl/` as the package maps them);
the trees alternate round by round, and each figure is the median over rounds of a round's
median step, so drift between rounds hits both trees alike. The forwards are timed by hooks
on the target and the draft (on the CPU a forward's time is its wall time; no graphs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = [(1, 0), (1, 4), (16, 0), (16, 4)]  # (batch, k)


def worker(steps: int, prompt_len: int) -> dict[str, dict[str, float]]:
    """One round in this process's tree: {"batch,k": {"step_ms", "forward_ms", "overhead_ms"}}."""
    import torch

    from adactl.bench.step import random_model
    from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan
    from adactl.runtime.feature_draft import FeatureDraft

    torch.set_num_threads(int(os.environ.get("OVERHEAD_THREADS", "1")))
    target = random_model("tiny", torch.device("cpu"), torch.float32)
    draft = FeatureDraft.from_target(target, list(range(target.config.vocab_size)), seed=0)
    inside = [0.0]
    started: list[float] = []

    def pre(module, args, kwargs=None):  # noqa: ANN001, ANN202
        started.append(time.perf_counter())

    def post(module, args, output):  # noqa: ANN001, ANN202
        inside[0] += time.perf_counter() - started.pop()

    for m in (target, draft):
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for batch, k in CASES:
            engine = Engine(target, draft, config=EngineConfig(max_batch_size=batch, seed=0, graphs=False))
            gen = torch.Generator().manual_seed(0)
            sampling = SamplingParams(max_new_tokens=(steps + 8) * (k + 1) + 8, stop_on_eos=False)
            for _ in range(batch):
                engine.add_request(torch.randint(target.config.vocab_size, (prompt_len,), generator=gen).tolist(),
                                   sampling)  # fmt: skip
            while any(v.status != "running" for v in engine.requests()):
                engine.step(StepPlan(draft_len=0, prefill_budget=batch * prompt_len))
            totals, forwards = [], []
            for i in range(steps + 3):
                inside[0] = 0.0
                t0 = time.perf_counter()
                engine.step(StepPlan(draft_len=k))
                if i >= 3:  # warm-up
                    totals.append(time.perf_counter() - t0)
                    forwards.append(inside[0])
            step, fwd = statistics.median(totals), statistics.median(forwards)
            over = statistics.median(t - f for t, f in zip(totals, forwards))
            out[f"{batch},{k}"] = {"step_ms": 1000 * step, "forward_ms": 1000 * fwd, "overhead_ms": 1000 * over}
    return out


def tree_for(commit: str) -> Path:
    """A worktree of `commit` under /tmp, importable as the package `adactl`."""
    root = Path("/tmp") / f"adactl-{commit}"
    if not root.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(root), commit], check=True, capture_output=True)
    for name in ("runtime", "estimators", "envs", "models"):
        link = root / "adactl" / name
        if not link.exists():
            link.symlink_to(Path("..") / name)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="another commit, measured side by side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--out", default="bench_results/issue31_overhead.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps, args.prompt_len)))
        return
    trees = {"this tree": Path.cwd()}
    if args.against:
        trees[args.against] = tree_for(args.against)
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, root in trees.items():
            env = {**os.environ, "PYTHONPATH": str(root)}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps),
                   "--prompt-len", str(args.prompt_len)]  # fmt: skip
            done = subprocess.run(cmd, env=env, cwd=root, check=True, capture_output=True, text=True)
            rounds[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds}: {name} done", file=sys.stderr)
    table = {name: {case: {m: statistics.median(x[case][m] for x in got) for m in got[0][case]} for case in got[0]}
             for name, got in rounds.items()}  # fmt: skip
    print("| batch | k | " + " | ".join(f"{n}: step / forwards / overhead (ms)" for n in trees)
          + " | overhead ratio | per forward ms |")  # fmt: skip
    print("|---|---|" + "---|" * len(trees) + "---|---|")
    names = list(trees)
    for case in table[names[0]]:
        b, k = case.split(",")
        cells = [f"{table[n][case]['step_ms']:.2f} / {table[n][case]['forward_ms']:.2f} / "
                 f"{table[n][case]['overhead_ms']:.2f}" for n in names]  # fmt: skip
        ratio = table[names[0]][case]["overhead_ms"] / table[names[-1]][case]["overhead_ms"] if len(names) > 1 else 1
        # the same ratio with each round's overhead per millisecond of its own forwards: the
        # forwards are the same model in both trees, so this takes out the machine's speed,
        # which drifts between the trees' processes (raw rounds move 0.24-0.80, these +-0.03)
        per_fwd = statistics.median(
            (a[case]["overhead_ms"] / a[case]["forward_ms"]) / (z[case]["overhead_ms"] / z[case]["forward_ms"])
            for a, z in zip(rounds[names[0]], rounds[names[-1]])
        )
        print(f"| {b} | {k} | " + " | ".join(cells) + f" | {ratio:.2f} | {per_fwd:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"table": table, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
