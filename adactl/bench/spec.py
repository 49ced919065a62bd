"""`adactl bench spec`: the speculation controllers side by side (the README's main job).

For each temperature and batch size B, the same B held-out ShareGPT prompts (seeded per
request) are served at once by every controller, through `ControlLoop` on one engine per
run; a round's runs take steps in turn, one step each (`interleaved`), each timed on its own
clock (`RunClock`), so that machine drift hits all alike.
Each run is a controller stack, labelled by its name in `adactl.stacks` (`adactl stacks`):
- `no-spec` and `fixed-k{k}`: plain decoding and standard speculative decoding;
- `heuristic,confidence-stop`: transformers' +2/-1 schedule with its 0.4 confidence stop;
- `bucket-ema`: SGLang-style accepted-length average per batch-size bucket;
- `goodput`: the draft length maximising predicted tokens / predicted step time;
- `goodput-req`: a draft length per request from its own acceptance estimate, the batch's
  draft tokens where they add the most expected tokens per predicted second;
- `fixed-k{sv_k},sv`: Speculative Verification (companion-signal acceptance, batch-aware
  verify lengths) after drafting `--sv-k`; `goodput,sv`: the goodput draft length, then SV;
- `oracle`: the best fixed k of that batch size with verification that knows the target's
  verdict (its peek at the target is off the clock): the upper bound;
- on the replay, two per-request bounds: `request-oracle` (per-request draft lengths from each
  request's acceptance known in hindsight, then the verify oracle: what perfect per-request
  estimates could gain) and `lookahead-oracle` (each step's verdict known before drafting:
  every row drafts exactly what the target accepts, where that pays).
`--workload mixed` serves chat and code requests in turn and, in one pass labelled `mixed`,
the temperatures in turn by pairs: greedy and sampled requests in one batch.
At batch sizes under `--min-requests` (8), a run serves that many requests in waves of B, the
next B joining when the last of the wave before has finished, and counts every wave after its
prefill step: one request of 32 tokens is too little to compare controllers by. At temperature
0.7 and batch 1, fixed k = 1's mean accepted length over ten seeds was 1.40 +- 9% (one
request each: `make bench` runs 15 and 17 missed their 0.97 there by that luck, and at batch 2
by fixed k = 2's rounds 25 and 31 tokens/s apart); eight requests divide that spread by about
2.8, for a cell about 8x longer at batch 1 (a cell at batch 1 was 2 s a run, at batch 64 about
20 s). `--quick`, `--tiny`, `--slo` and the replay keep one wave.
`--saturated N` serves N x B requests, B at a time, a finished request replaced by the next
at once, and counts tokens/s while the batch is kept full: a loaded server's throughput.
Without it, B requests run once to completion and the slowest requests' tail (a batch that
empties) weighs in the rate: a policy that finishes some requests sooner is not credited
for it there, which hides what per-request draft lengths gain (docs/per_request.md).
With `--trees`, token-tree stacks run next to them on the same prompts and seeds:
- `tree-d{D}w{W}n{N}`: a fixed tree (depth D, W alternatives per level, N nodes kept), all
  verified: the tree counterpart of fixed k;
- `tree-d{D}w{W}n{N},tree-alloc`: the tree `--tree` drafted, then the batch-aware global
  allocation of the verify budget over all rows' nodes (calibrated draft confidence);
- `goodput-tree,tree-alloc`: tree depth from the goodput length (no draft when c* = 0), then
  the global allocation;
- `goodput-req-tree,tree-alloc`: a tree depth (or chain length) per request from its own
  acceptance, the batch's budget where it pays most, then the global allocation;
- `tree-oracle`: the best fixed tree of that batch size, verified with the target's verdict.
`--controllers` runs any other stacks instead (';'-separated).
`ratio_best_chain` compares each run with the best chain controller of its batch size (the
chain oracle excluded).
SV's runs load the companion next to the draft (its cost counts); the others run the draft
alone. Each batch size runs `--rounds` rounds; the oracles, which follow the round's best
fixed configuration, take their steps in turn after it. A record is a configuration's fastest
round, as `timeit` reports (other work on the machine only ever slows a run down); `rounds`
lists every round's tokens/s. `ratio_paired` is the median over rounds of a run's tokens/s
over the best fixed configuration's *in the same round* (`round_ratios`, in round order):
drift between rounds, which on a shared 2-core machine moves every configuration of a round
by up to 40%, cancels in it.
Each round samples anew: request i of round r is seeded `--seed` + 100000 r + i in every run of
that round (common random numbers within a round, new draws between rounds), and the
controllers' own draws (`goodput`'s probes) are seeded `--seed` + 100000 r + B: with one seed
for every run, `goodput` drew the same probes at the same steps of every run (a whole-batch
k = 1 step at batch 32-64, 1.7% of a 32-step run where plain decoding was best: `StackContext`). A sampled run's
rate is luck as much as timing: at batch 4, temperature 0.7, 32 new tokens, fixed k = 1's
mean accepted length over ten seeds was 1.33-1.49 (sd 3.4%) and its steps 23-28, and
`goodput` ÷ fixed k = 1 per seed 0.91-1.16, 1.016 on average (`docs/issue30/sampling_luck.py`).
With one seed for every round, as before 2026-12-05, a configuration's lucky draw was its
draw in every round and every run: seed 0 gave fixed k = 1 1.51 there, and that cell missed
0.97 in `make bench` runs 6, 8, 13 and 14. Greedy runs draw nothing: their rounds are
unchanged.
Reported per run: tokens/s (tokens generated after each wave's first step, its prefill, per
second of the run's own steps, controller time included; `first_step_s` is the first wave's
prefill step; `requests` and `waves` what it served), mean accepted length (tokens per decode
row per step), step ms, `ratio_best_fixed` (to the best constant k, 0 included) and
`ratio_oracle`; in spec.json also what each step did (`actions`, in order, run-length coded,
and `action_ms`, each kind's steps and mean ms: `action_of`), so that a cell's ratio can be
taken apart afterwards (`make bench` run 56's 0.7 batch 16: a mostly plain run 6% slower a step
than plain decoding, and the bench could not say which steps drafted).
After each cell (a temperature and batch size) every record so far is written to
`spec.partial.json` (removed when the run ends): a stopped run keeps its finished cells, and
`--resume` runs only the others (a whole `make bench` takes 30-170 min on a 2-core CPU; run 57
was stopped after 78 min and kept nothing). The cells it keeps were served beside estimators
that had learned from the cells before them; the resumed ones start from the priors again.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adactl import settings
from adactl.bench.common import StepLog, format_table, save_figure, write_json
from adactl.controllers import (
    FixedDraftLength,
    TreeDraft,
    oracle,
    request_oracle,
)
from adactl.estimators import load_acceptance
from adactl.loop import ControlLoop
from adactl.runtime import Engine, EngineConfig, SamplingParams, TreeSpec, freeze_heap
from adactl.runtime.models import SHIPPED_MODELS
from adactl.runtime.replay import ReplayEngine
from adactl.settings import DeviceSettings, ProfileSettings, floats, ints, setting
from adactl.stacks import StackContext, build_stack, is_fixed, needs_companion, stack_list, untrained_acceptance

COLUMNS = ["temperature", "batch_size", "controller", "tokens_per_s", "mean_accepted_len", "step_ms",
           "ratio_best_fixed", "ratio_paired", "ratio_oracle"]  # fmt: skip
TREE_COLUMNS = [*COLUMNS, "ratio_best_chain"]
# `--slo --replay` defaults, on the replay's regime (a computed H100 x 8B: plain steps 6.5-9 ms up to 64 rows):
# a tight class only speculation meets, a medium one plain decoding meets while the batch is small, a loose one
REPLAY_SLO_TPOT, REPLAY_SLO_RATE, REPLAY_SLO_REQUESTS = (0.006, 0.009, 0.015), 30.0, 400
ORACLES = ("oracle", "tree-oracle", "request-oracle", "lookahead-oracle")  # upper bounds, not controllers
MIXED = "mixed"  # the temperature of a pass whose requests take the temperatures in turn (--workload mixed)
DEFAULT_MIN_REQUESTS = 8  # batch 1, 2, 4 on the engine serve 8 requests in waves (the module docstring)
ROUND_SEEDS = 100_000  # round r samples request i with seed + ROUND_SEEDS * r + i (the module docstring)
Temperature = float | str  # a temperature, or MIXED


def stacks(ks: list[int], sv_k: int) -> list[str]:
    """The chain stacks of a run (names from `adactl.stacks`)."""
    return ["no-spec", *(f"fixed-k{k}" for k in ks), "heuristic,confidence-stop", "bucket-ema", "goodput",
            "goodput-req", f"fixed-k{sv_k},sv", "goodput,sv"]  # fmt: skip


def tree_stacks(trees: list[TreeSpec], alloc_tree: TreeSpec) -> list[str]:
    """The token-tree stacks of `--trees`."""
    return [*(TreeDraft(t).name for t in trees), f"{TreeDraft(alloc_tree).name},tree-alloc", "goodput-tree,tree-alloc",
            "goodput-req-tree,tree-alloc"]  # fmt: skip


def tree_spec(text: str) -> TreeSpec:
    """`D,W,N` or `dDwWnN` -> TreeSpec(D, W, N)."""
    parts = text.replace("d", " ").replace("w", " ").replace("n", " ").replace(",", " ").split()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a tree is depth,width,nodes (e.g. 4,2,8), got {text!r}")
    return TreeSpec(*(int(p) for p in parts))


def request_temperature(temperature: Temperature, i: int, temperatures: list[float]) -> float:
    """Request i's temperature: the pass's, or in a `mixed` pass the temperatures in turn by
    pairs (the mixed workload's prompts alternate chat and code, so each pair of a chat and a
    code request shares a temperature, and every kind meets every temperature)."""
    return temperatures[(i // 2) % len(temperatures)] if temperature == MIXED else float(temperature)


def cell_requests(batch: int, args: SpecSettings) -> int:
    """Requests a run at batch size `batch` serves: N x B with `--saturated N`, else B, in as many
    waves of B as `--min-requests` asks for."""
    if args.saturated:
        return batch * args.saturated
    return batch * math.ceil(max(args.min_requests or 1, batch) / batch)


def prompt_count(args: SpecSettings) -> int:
    """Prompts a sweep needs: its largest cell's requests."""
    return max(cell_requests(b, args) for b in args.batches)


def in_flight(group: list[list[int]], args: SpecSettings, batch: int | None = None) -> int:
    """Requests served at once in a run over `group`: `batch` (the cell's batch size), else all
    of them, or with `--saturated N` one N-th."""
    return batch if batch is not None else len(group) // max(args.saturated, 1)


def prefill_for(group: list[list[int]], args: SpecSettings, batch: int | None = None) -> int:
    """A run's prefill budget: every prompt served at once in one step (in waves: the largest
    wave's)."""
    b = in_flight(group, args, batch)
    if args.saturated:
        return sum(len(p) for p in group[:b])
    return max(sum(len(p) for p in group[i : i + b]) for i in range(0, len(group), b))


class RunClock:
    """A run's own clock: the wall seconds spent inside its own steps. `interleaved` steps a
    round's runs in turn, one step each, so that every configuration is timed over the same
    seconds of the machine: on this shared 2-core machine its speed moves by up to 35% over
    tens of seconds (identical plain-decoding runs one after another: 58-78 tokens/s at batch
    16; interleaved step by step: within 3-5% of each other). `ScheduleState.now` is then the
    run's own time, not the engine's request stamps (wall time): stacks that read deadlines
    belong in `--slo`, which serves on the wall clock."""

    def __init__(self) -> None:
        self.spent = 0.0
        self.since: float | None = None

    def __call__(self) -> float:
        return self.spent + (time.perf_counter() - self.since if self.since is not None else 0.0)

    def __enter__(self) -> RunClock:
        self.since = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.spent = self()
        self.since = None


class Serving:
    """One run, a step at a time: B requests at once to completion, in waves of B when the run
    has more (`--min-requests`: the next wave joins when the last request of the one before has
    finished), or with `--saturated N` B = len(prompts) / N at once, a finished request replaced
    by the next at once; `result()` is its counts and rate.

    The rate counts from the end of each wave's first step, the wave's prefill: the same prompts,
    the same work for every configuration, which no speculation controller acts on; one step of
    seconds, it moved by 15% between identical runs even interleaved. With `--saturated N`
    it counts until the last step that started with requests still waiting to join: a loaded
    server's throughput, without the tail where the batch empties."""

    def __init__(self, engine: Any, loop: ControlLoop, prompts: list[list[int]], temperature: Temperature,
                 args: SpecSettings, bar: tqdm, batch: int | None = None, **label: Any) -> None:  # fmt: skip
        self.engine, self.loop, self.prompts, self.bar, self.label = engine, loop, prompts, bar, label
        self.temperature, self.args = temperature, args
        self.batch = in_flight(prompts, args, batch)
        self.saturated = bool(args.saturated) and self.batch < len(prompts)
        self.added = self.steps = self.row_steps = self.decode_tokens = self.drafted = self.emitted = 0
        self.control_s = 0.0
        self.waves = 1
        self.actions: list[list[Any]] = []  # [action, steps in a row] in step order (`action_of`)
        self.action_s: dict[str, float] = {}  # action -> its steps' seconds on the run's clock
        self.counted = (0.0, 0, 0)  # the finished waves' counted seconds, tokens and steps
        self.peek = getattr(loop.verify_controller, "estimator", None)  # the oracle's look at the target
        self.timer = loop.clock if isinstance(loop.clock, RunClock) else contextlib.nullcontext()
        self._add(self.batch)
        self.origin = self.start = self._mark()
        self.first = self.full = self.start  # (clock, tokens emitted, steps) after the wave's step 1; while kept full
        self.first_step_s = 0.0  # the first wave's prefill step

    def _mark(self) -> tuple[float, int, int]:
        return self.loop.clock() - getattr(self.peek, "seconds", 0.0), self.emitted, self.steps

    def _add(self, count: int) -> None:
        """Request i of every run has the same prompt, sampling seed and (replay) draws, under
        an id of its own run: estimators shared by a round's runs (`RunContext`) keep
        per-request state by id, and the runs interleave."""
        replay = isinstance(self.engine, ReplayEngine)
        for i in range(self.added, min(self.added + count, len(self.prompts))):
            t = request_temperature(self.temperature, i, self.args.temperatures)
            sampling = SamplingParams(self.args.max_new_tokens, temperature=t, seed=self.args.seed + i)
            self.engine.add_request(self.prompts[i], sampling, request_id=f"{self.label['controller']}/req-{i}",
                                    **({"draws": f"req-{i}"} if replay else {}))  # fmt: skip
        self.added = min(self.added + count, len(self.prompts))

    @property
    def done(self) -> bool:
        return not self.engine.has_unfinished()

    def step(self) -> None:
        before = self._mark()[0]
        with self.timer:
            record = self.loop.step()
        o = record.outcome
        action = action_of(record)
        if self.actions and self.actions[-1][0] == action:
            self.actions[-1][1] += 1
        else:
            self.actions.append([action, 1])
        self.action_s[action] = self.action_s.get(action, 0.0) + self._mark()[0] - before
        self.steps += 1
        self.row_steps += len(o.request_ids)
        self.drafted += int(o.drafted.sum())
        self.decode_tokens += sum(len(o.emitted[r]) for r in o.request_ids)
        self.emitted += o.tokens_emitted
        self.control_s += record.control_s
        self.bar.update(o.tokens_emitted)
        if self.steps == self.start[2] + 1:  # the wave's first step: its prefill
            self.first = self._mark()
            if self.waves == 1:
                self.first_step_s = self.first[0] - self.start[0]
        if self.saturated:
            if self.added < len(self.prompts):
                self.full = self._mark()
            self._add(len(o.finished))
        elif self.done and self.added < len(self.prompts):  # the next wave
            self.counted = self._wave_total()
            self.start = self.first = self._mark()
            self.waves += 1
            self._add(self.batch)
        if self.done and hasattr(self.engine, "close"):  # its KV back now: a reserved cache keeps it until
            self.engine.close()  # the engine is collected (`make bench` ran out of 24 GB at batch 64 without this)

    def _action_steps(self) -> dict[str, int]:
        """Each action's steps, from the run-length coded `actions`."""
        steps: dict[str, int] = {}
        for action, n in self.actions:
            steps[action] = steps.get(action, 0) + n
        return steps

    def _wave_total(self) -> tuple[float, int, int]:
        """The counted seconds, tokens and steps with the wave now served included: after its
        first step (a wave of one step, its prefill, adds nothing)."""
        end = self._mark()
        if end[2] <= self.first[2]:
            return self.counted
        return tuple(c + e - b for c, e, b in zip(self.counted, end, self.first))  # type: ignore[return-value]

    def result(self) -> dict[str, Any]:
        if self.saturated:
            begin = self.first if self.full[2] > self.first[2] else self.start
            counted_s, counted, counted_steps = (e - b for e, b in zip(self.full, begin))
        else:
            counted_s, counted, counted_steps = self._wave_total()
            if counted_steps == 0:  # nothing after any prefill (1-token requests): the whole run
                counted_s, counted, counted_steps = (e - b for e, b in zip(self._mark(), self.origin))
        return {
            **self.label,
            "tokens": sum(len(r.output_ids) for r in self.loop.results.values()),
            "requests": self.added,
            "waves": self.waves,
            "wall_s": self._mark()[0] - self.origin[0],
            "first_step_s": self.first_step_s,
            "tokens_per_s": counted / counted_s if counted_s > 0 else float("nan"),
            "mean_accepted_len": self.decode_tokens / max(self.row_steps, 1),
            "mean_draft_len": self.drafted / max(self.row_steps, 1),
            "step_ms": 1000 * counted_s / max(counted_steps, 1),
            # the controllers' decisions per step, on the run's clock (the replay's does not move for them: 0)
            "control_ms": 1000 * self.control_s / max(self.steps, 1),
            "steps": self.steps,
            # what each step did, in order and by kind with its mean ms (`action_of`): what a ratio
            # alone cannot say, e.g. which steps of a mostly plain run drafted and what they cost
            "actions": [list(a) for a in self.actions],
            "action_ms": {a: [n, 1000 * self.action_s[a] / n] for a, n in sorted(self._action_steps().items())},
            "fallbacks": dict(self.loop.fallbacks),
        }


def action_of(record: Any) -> str:
    """A step's kind: "RxK" for R rows decoding, each drafting K tokens ("RxJ-K" when rows
    drafted J to K; a tree's K counts its nodes), "+p" where it also prefilled; "prefill" for a
    step that only prefilled (a wave's first)."""
    o = record.outcome
    rows = len(o.request_ids)
    if rows == 0:
        return "prefill"
    drafted = o.drafted.tolist()
    low, high = min(drafted), max(drafted)
    action = f"{rows}x{high}" if low == high else f"{rows}x{low}-{high}"
    return action + ("+p" if int(o.prefill_tokens) else "")


def interleaved(runs: Sequence[Callable[[], Serving]], seed: int, interleave: bool = True) -> list[dict[str, Any]]:
    """Start the runs and step each in turn, one step each, in an order shuffled every turn
    (seeded: the position after another run's step is nobody's for long), until all have
    finished; their results in the order given. Without `interleave`, each run is started and
    served to completion before the next starts (one engine's memory at a time)."""
    if not interleave:
        return [_served(start()) for start in runs]
    rng = random.Random(seed)
    started = [start() for start in runs]
    live = [run for run in started if not run.done]
    while live:
        rng.shuffle(live)
        for run in live:
            run.step()
        live = [run for run in live if not run.done]
    return [run.result() for run in started]


def _served(run: Serving) -> dict[str, Any]:
    while not run.done:
        run.step()
    return run.result()


def is_fixed_tree(stack: str) -> bool:
    return re.fullmatch(r"tree-d\d+w\d+n\d+", stack) is not None


def is_tree(stack: str) -> bool:
    return "tree" in stack


def round_ratio(run: dict[str, Any], here: list[dict[str, Any]]) -> float:
    """A run's tokens/s over the best fixed configuration's in the same round (interleaved with it,
    or with `--no-interleave` minutes apart at most; the oracles: the phase after it)."""
    fixed = [x["tokens_per_s"] for x in here if is_fixed(x["controller"])]
    return run["tokens_per_s"] / max(fixed) if fixed else float("nan")


def add_ratios(records: list[dict[str, Any]]) -> None:
    groups: dict[tuple[float, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["temperature"], r["batch_size"]), []).append(r)
    for group in groups.values():
        fixed = [r["tokens_per_s"] for r in group if is_fixed(r["controller"])]
        best_fixed = max(fixed) if fixed else float("nan")
        oracle_tps = next((r["tokens_per_s"] for r in group if r["controller"] == "oracle"), float("nan"))
        chains = [r["tokens_per_s"] for r in group if not is_tree(r["controller"]) and r["controller"] not in ORACLES]
        best_chain = max(chains) if chains else float("nan")
        for r in group:
            r["ratio_best_fixed"] = r["tokens_per_s"] / best_fixed
            r["ratio_oracle"] = r["tokens_per_s"] / oracle_tps
            r["ratio_best_chain"] = r["tokens_per_s"] / best_chain
            if r.get("round_ratios"):
                r["ratio_paired"] = statistics.median(r["round_ratios"])


def best_adaptive_summary(records: list[dict[str, Any]]) -> str:
    """Per temperature, the best adaptive run's ratio to the best fixed k by batch size, fastest round
    and paired (the oracles are not adaptive controllers)."""
    lines = []
    for t in sorted({r["temperature"] for r in records}, key=str):
        fastest, paired, batches = [], [], []
        for b in sorted({r["batch_size"] for r in records}):
            ada = [r for r in records if r["temperature"] == t and r["batch_size"] == b
                   and not is_fixed(r["controller"]) and not is_fixed_tree(r["controller"])
                   and r["controller"] not in ORACLES]  # fmt: skip
            if ada:
                batches.append(str(b))
                fastest.append(f"{max(r['ratio_best_fixed'] for r in ada):.2f}")
                known = [r["ratio_paired"] for r in ada if math.isfinite(r.get("ratio_paired", math.nan))]
                paired.append(f"{max(known):.2f}" if known else "-")
        lines.append(f"temperature {t}: best adaptive / best fixed k at batch {' / '.join(batches)}: "
                     f"fastest round {' / '.join(fastest)}; paired {' / '.join(paired)}")  # fmt: skip
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = sorted({r["temperature"] for r in records}, key=str)
    fig, axes = plt.subplots(1, len(temps), figsize=(6.5 * len(temps), 4.8), squeeze=False)
    for ax, t in zip(axes[0], temps):
        names = list(dict.fromkeys(r["controller"] for r in records))
        colors = [plt.get_cmap("tab20")(i) for i in range(20)]  # more controllers than the default 10 colours
        for n, name in enumerate(names):
            rows = sorted((r for r in records if r["controller"] == name and r["temperature"] == t),
                          key=lambda r: r["batch_size"])  # fmt: skip
            style = "--" if is_fixed(name) or is_fixed_tree(name) else (":" if is_tree(name) else "-")
            ax.plot([r["batch_size"] for r in rows], [r["tokens_per_s"] for r in rows], style, marker="o", label=name,
                    color=colors[n % len(colors)])  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"temperature {t}")
        ax.legend(fontsize=7)
    save_figure(fig, path, title, fontsize=12)


def _load(args: SpecSettings) -> tuple[Any, Any, Any, list[list[int]], RunContext, dict[str, Any]]:
    """target model, draft, draft with companion, prompts, what controllers are made from, meta.

    The step costs (`ctx.costs(companion)`) are this machine's profiles
    (adactl.profiler.step_cost_for), one model per engine kind shared by all its runs, as one
    server's would be: refined online from every step any run serves."""
    from adactl.profiler import tiny_pair
    from adactl.runtime.device import describe, device_and_dtype
    from adactl.runtime.models import ModelPair, load_pair

    device, dtype = device_and_dtype(args.device, args.dtype)  # before anything loads
    if args.tiny:
        from adactl.runtime import FeatureDraft

        alone = tiny_pair(device, dtype)
        companion = FeatureDraft.from_target(alone.target.model, list(range(192)), 32, seed=2).eval()
        both = ModelPair(alone.target, alone.draft, companion, device, dtype,
                         {**alone.specs, "companion": "tiny-companion"})  # fmt: skip
        g = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(1, 256, (int(k),), generator=g).tolist()
                   for k in torch.randint(4, 24, (prompt_count(args),))]  # fmt: skip
        acceptance: Callable[[str], Any] = untrained_acceptance
        meta: dict[str, Any] = {"target": "tiny random Llama"}
    else:
        from adactl.workloads import spec_prompts

        both = load_pair(args.target, args.draft, args.companion, device, dtype)
        alone = ModelPair(both.target, both.draft, None, device, dtype, {**both.specs, "companion": "none"})
        prompts = spec_prompts(both.tokenizer, args.workload, prompt_count(args), args.max_prompt_tokens)
        est = SHIPPED_MODELS / "estimators"

        def acceptance(name: str) -> Any:
            return load_acceptance(est / f"{name}.json")

        meta = {"target": args.target, "draft": args.draft, "companion": args.companion, "estimators": str(est),
                "workload": args.workload}  # fmt: skip
    costs = CostModels(alone, both, args.profile, args.profile_sv, args.refine, max(args.batches))
    ctx = RunContext(acceptance, costs, args.tree_width, args.tree_extra_nodes, log_steps=args.validate)
    meta["machine"] = describe(device, dtype).to_dict()
    meta["profile"] = args.profile or "this machine's (cached)"
    meta["refine"] = args.refine
    return both.target.model, both.draft, both.speculator(with_companion=True), prompts, ctx, meta


class CostModels:
    """The step-cost model of each engine kind a bench runs (the draft alone; the draft with its
    companion), made on first use from this machine's profile or the one named."""

    def __init__(self, alone: Any, both: Any, profile: str | None, profile_sv: str | None, refine: bool,
                 max_batch: int) -> None:  # fmt: skip
        self.pairs = {False: alone, True: both}
        self.files = {False: profile, True: profile_sv or profile}
        self.refine, self.max_batch = refine, max_batch
        self.models: dict[bool, Any] = {}

    def __call__(self, companion: bool) -> Any:
        from adactl.profiler import step_cost_for

        if companion not in self.models:
            self.models[companion] = step_cost_for(self.pairs[companion], self.files[companion], self.refine,
                                                   max_batch=self.max_batch)  # fmt: skip
        return self.models[companion]


@dataclass(frozen=True)
class RunContext:
    """What a bench's controllers are made from: acceptance estimators by name (as
    `StackContext.acceptance`), the step-cost model of each engine kind, the tree width.

    With a `temperature`, the estimators are shared by every run at that temperature, as the
    step-cost models are by every run of an engine kind, and the per-position moving average
    learns from every run's steps (`learners`): a server's estimators learn from every step
    it serves, while a fresh one per run of 24-40 steps stays at its prior (the shipped
    average over greedy and sampled rows, 10% under greedy acceptance: goodput then ran plain
    decoding at batch 1, where k = 4 was 14% faster; issue 30)."""

    acceptance: Callable[[str], Any]
    costs: Callable[[bool], Any]  # CostModels, or the replay's
    tree_width: int = 2
    tree_extra_nodes: int = 0
    shared: dict[tuple[str, Temperature], Any] = field(default_factory=dict)
    log_steps: bool = False  # each run's steps in its record's "step_log" (`--validate`)

    def stack_context(self, companion: bool, temperature: Temperature | None = None) -> StackContext:
        """The stacks' context on an engine with (or without) the companion: its step-cost model."""
        acceptance = self.acceptance
        if temperature is not None:

            def acceptance(name: str) -> Any:
                if (name, temperature) not in self.shared:
                    self.shared[(name, temperature)] = self.acceptance(name)
                return self.shared[(name, temperature)]

        return StackContext(self.costs(companion), acceptance, tree_width=self.tree_width,
                            tree_extra_nodes=self.tree_extra_nodes)

    def learners(self, temperature: Temperature) -> list[Any]:
        """The estimators every run at `temperature` updates, whatever its stack: the moving
        average of acceptance by position (it reads any engine's verdicts)."""
        return [self.stack_context(False, temperature).acceptance("moving_average")]


MAX_DRAFT_LEN = 8
"""The longest draft a bench's run may ask for (its control loop's bound)."""


@dataclass(frozen=True)
class Engines:
    """A fresh engine for each run: the draft alone, or the draft with its companion, its KV
    reserved for `batch` rows of `columns` columns (0: none), as a server sizes its KV at
    start-up (vLLM's preallocated blocks).

    Without a reservation a cache grows as its widest row does, 16 columns at a time, and
    copies itself each time; a k-token step widens it by k + 1 columns, holes included, so
    speculation paid for more copies than plain decoding did. At batch 64 of the default pair
    (0.9 GB of KV) a copy took 90-140 ms, up to 900 ms on fresh pages, against 180-600 ms steps:
    in a bench-like run (32 tokens, prompts of 16-256) 4-12% of fixed k = 1's and k = 4's time,
    1% of plain decoding's. Reserved, interleaved with the same runs unreserved (two rounds,
    `docs/issue30/kv_growth/growth.py`): k = 1 +2.6/+3.0%, k = 4 +3.5/+3.8%, plain +0.6/+0.6%;
    batch 8, k = 2: +5.1/+1.6%; the KV 1.18 GB against a peak of 0.88-1.01 GB."""

    target: Any
    draft: Any
    pair: Any  # the speculator with the companion
    columns: int = 0

    def __call__(self, companion: bool, batch: int) -> Any:
        engine = Engine(self.target, self.pair if companion else self.draft, config=EngineConfig(max_batch_size=batch))
        if self.columns and engine.graphs is None:  # (with graphs every forward attends over the capacity)
            engine.reserve(batch, self.columns)
        return engine


def kv_columns(prompts: list[list[int]], args: SpecSettings) -> int:
    """The KV columns a bench's row can reach: its longest prompt, the tokens it generates and a
    step's drafts, with the holes compaction allows (a quarter of the width) on top."""
    return math.ceil((max(map(len, prompts), default=0) + args.max_new_tokens + MAX_DRAFT_LEN + 1) * 4 / 3)


def _loop(engine: Any, **kwargs: Any) -> ControlLoop:
    """The control loop of one run, on the engine's clock (the replay's is simulated) or on the
    run's own (`RunClock`: the wall seconds of its own steps)."""
    clock = getattr(engine, "clock", None) or RunClock()
    return ControlLoop(engine, max_draft_len=MAX_DRAFT_LEN, clock=clock, **kwargs)


def start_one(stack: str, engines: Callable[[bool, int], Any], group: list[list[int]], temperature: Temperature,
              ctx: RunContext, args: SpecSettings, bar: tqdm, batch: int | None = None) -> Serving:  # fmt: skip
    companion = needs_companion(stack)
    engine = engines(companion, in_flight(group, args, batch))
    here = replace(ctx.stack_context(companion, temperature), seed=args.seed + (batch or 0))  # (the round's draws)
    built = build_stack(stack, here)
    log = [StepLog()] if ctx.log_steps else []
    loop = _loop(engine, schedule=built.schedule, verify=built.verify, prefill_budget=prefill_for(group, args, batch),
                 estimators=[here.cost(), *ctx.learners(temperature), *log])  # fmt: skip
    run = Serving(engine, loop, group, temperature, args, bar, batch, controller=stack)
    if log:
        run.label["step_log"] = log[0].steps  # filled as it runs
    return run


def start_oracle(here: list[dict[str, Any]], engines: Callable[[bool, int], Any], group: list[list[int]],
                 temperature: Temperature, ctx: RunContext, args: SpecSettings, bar: tqdm,
                 batch: int | None = None) -> Serving:  # fmt: skip
    """The oracle drafts the best constant k of this round and verifies with the target's verdict."""
    fixed = [r for r in here if is_fixed(r["controller"])]
    best = max(fixed, key=lambda r: r["tokens_per_s"])["controller"] if fixed else f"fixed-k{args.sv_k}"
    k = 0 if best == "no-spec" else int(best.removeprefix("fixed-k"))
    engine = engines(False, in_flight(group, args, batch))
    cost = ctx.costs(False)
    loop = _loop(engine, schedule=[FixedDraftLength(k)], verify=oracle(engine, cost), estimators=[cost],
                 prefill_budget=prefill_for(group, args, batch))  # fmt: skip
    return Serving(engine, loop, group, temperature, args, bar, batch, controller="oracle", oracle_k=k)


def start_tree_oracle(here: list[dict[str, Any]], engines: Callable[[bool, int], Any], group: list[list[int]],
                      temperature: Temperature, ctx: RunContext, args: SpecSettings, bar: tqdm,
                      batch: int | None = None) -> Serving:  # fmt: skip
    """The tree oracle drafts the best fixed tree of this round and verifies with the target's verdict."""
    fixed = [r for r in here if is_fixed_tree(r["controller"])]
    best = max(fixed, key=lambda r: r["tokens_per_s"])["controller"] if fixed else TreeDraft(args.tree).name
    spec = tree_spec(best.removeprefix("tree-"))
    engine = engines(False, in_flight(group, args, batch))
    cost = ctx.costs(False)
    loop = _loop(engine, schedule=[TreeDraft(spec)], verify=oracle(engine, cost), estimators=[cost],
                 prefill_budget=prefill_for(group, args, batch))  # fmt: skip
    return Serving(engine, loop, group, temperature, args, bar, batch, controller="tree-oracle", oracle_tree=best)


def start_request_oracle(engines: Callable[[bool, int], Any], group: list[list[int]], temperature: Temperature,
                         ctx: RunContext, args: SpecSettings, bar: tqdm,
                         lookahead: bool = False, batch: int | None = None) -> Serving:  # fmt: skip
    """A per-request bound (the replay only): each request's acceptance known in hindsight
    (`lookahead`: each step's verdict), per-request goodput on it, then the verify oracle."""
    engine = engines(False, in_flight(group, args, batch))
    cost = ctx.costs(False)
    schedule, verify = request_oracle(engine, cost, lookahead)
    loop = _loop(engine, schedule=[schedule], verify=verify, estimators=[cost],
                 prefill_budget=prefill_for(group, args, batch))  # fmt: skip
    return Serving(engine, loop, group, temperature, args, bar, batch, controller=schedule.name)


def main(namespace: argparse.Namespace) -> list[dict[str, Any]]:
    return run(settings.from_args(SpecSettings, namespace))


def sweep(engines: Callable[[bool, int], Any], prompts: list[list[int]], ctx: RunContext, chosen: list[str],
          oracles: list[str], args: SpecSettings, label: str = "bench spec", done: Sequence[dict[str, Any]] = (),
          on_cell: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Every stack and oracle at every temperature and batch size, `args.rounds` rounds each:
    one record per configuration (its fastest round, with every round's tokens/s). `done`: the
    records of cells (temperature, batch size) a stopped run finished, kept as they are and not
    run again (`--resume`); `on_cell` is called with every record so far after each cell."""
    records: list[dict[str, Any]] = [dict(r) for r in done]
    finished = {cell_key(r) for r in records}
    freeze_heap()  # no full collection over the loaded models' objects inside a timed step
    passes: list[Temperature] = [MIXED] if args.workload == MIXED else list(args.temperatures)
    cells = [(t, b) for t in passes for b in args.batches if (t, b) not in finished]
    total = sum(cell_requests(b, args) * args.max_new_tokens * (len(chosen) + len(oracles)) for _, b in cells) * (
        args.rounds or 1
    )
    bar = tqdm(total=total, desc=label, unit="tok")
    for temperature in passes:
        for batch in args.batches:
            if (temperature, batch) in finished:
                continue
            group = prompts[: cell_requests(batch, args)]
            rounds: list[list[dict[str, Any]]] = []
            for r in range(args.rounds or 1):
                order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]  # rotated (for --no-interleave)
                seed = args.seed + 1000 * r + batch
                drawn = replace(args, seed=args.seed + ROUND_SEEDS * r)  # this round's sampling seeds, all its runs
                here = interleaved([partial(start_one, name, engines, group, temperature, ctx, drawn, bar, batch)
                                    for name in order], seed, args.interleave)  # fmt: skip
                bounds = []  # the oracles follow the round's best fixed configuration: a second turn
                if "oracle" in oracles:
                    bounds.append(partial(start_oracle, here, engines, group, temperature, ctx, drawn, bar, batch))
                if "tree-oracle" in oracles:
                    bounds.append(partial(start_tree_oracle, here, engines, group, temperature, ctx, drawn, bar,
                                          batch))  # fmt: skip
                for name in ("request-oracle", "lookahead-oracle"):
                    if name in oracles:
                        bounds.append(partial(start_request_oracle, engines, group, temperature, ctx, drawn, bar,
                                              name == "lookahead-oracle", batch))  # fmt: skip
                here += interleaved(bounds, seed + 1, args.interleave)
                rounds.append(here)
            for name in [*chosen, *oracles]:
                mine = [(x, here) for here in rounds for x in here if x["controller"] == name]  # in round order
                best = dict(max((x for x, _ in mine), key=lambda x: x["tokens_per_s"]))
                best.update(temperature=temperature, batch_size=batch,
                            rounds=sorted(x["tokens_per_s"] for x, _ in mine),
                            round_ratios=[round_ratio(x, here) for x, here in mine])  # fmt: skip
                records.append(best)
            if on_cell is not None:
                on_cell(records)
    bar.close()
    return records


def cell_key(record: dict[str, Any]) -> tuple[Temperature, int]:
    """A record's cell: (temperature, batch size)."""
    return record["temperature"], int(record["batch_size"])


RESUME_IGNORED = ("resume", "out")
"""Settings a resumed run may change: everything else must be the stopped run's."""


def partial_path(out: Path, stem: str) -> Path:
    """Where a run keeps the cells it has finished until it ends (`--resume` reads it)."""
    return out / f"{stem}.partial.json"


def resumed_cells(path: Path, args: SpecSettings) -> list[dict[str, Any]]:
    """The finished cells' records of the stopped run at `path`, if it ran with these settings."""
    import json

    if not path.is_file():
        raise SystemExit(f"adactl bench spec --resume: no stopped run to resume ({path} does not exist; a run "
                         "that finished removes it)")  # fmt: skip
    try:
        saved = json.loads(path.read_text())
        records, then = list(saved["records"]), dict(saved["meta"]["args"])
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"adactl bench spec --resume: {path} is not a stopped run's record ({e})") from e
    now = json.loads(json.dumps(_settings(args)))  # as the record holds them (tuples as lists)
    differ = sorted(k for k in now.keys() | then.keys() if k not in RESUME_IGNORED and now.get(k) != then.get(k))
    if differ:
        raise SystemExit(f"adactl bench spec --resume: {path} was run with other settings ({', '.join(differ)}): "
                         "resume with the stopped run's, or start anew without --resume")  # fmt: skip
    return records


def run(args: SpecSettings) -> list[dict[str, Any]]:
    args = args.resolved()
    torch.manual_seed(args.seed)
    engines: Callable[[bool, int], Any]
    if args.replay:
        from adactl.bench.spec_replay import load_replay

        engines, prompts, ctx, meta, chosen, oracles = load_replay(args)
        if args.slo:
            return _slo(args, engines, prompts, ctx, meta)
    else:
        target, draft, pair, prompts, ctx, meta = _load(args)
        if args.slo:
            return _slo(args, Engines(target, draft, pair, kv_columns(prompts, args)), prompts, ctx, meta)
        if args.validate and args.tiny:
            raise SystemExit("adactl bench spec --validate: the default pair only (its traces are shipped)")
        if args.validate and args.trees:
            from adactl.runtime.traces import shipped_traces

            if shipped_traces(args.workload, tree_width=args.tree_width).tree_width != args.tree_width:
                raise SystemExit(f"adactl bench spec --validate --trees: no shipped width-{args.tree_width} "
                                 f"tree traces of {args.workload} (python train/record_traces.py --tree-width "
                                 f"{args.tree_width})")  # fmt: skip
        engines = Engines(target, draft, pair, kv_columns(prompts, args))
        chosen = args.controllers or [
            *stacks(args.ks, args.sv_k),
            *(tree_stacks(args.fixed_trees, args.tree) if args.trees else []),
        ]
        oracles = ["oracle", "tree-oracle"] if args.trees else ["oracle"]
    if args.validate:
        from adactl.bench.spec_replay import validate

        return validate(args, sweep(engines, prompts, ctx, chosen, oracles, args), ctx, prompts, chosen, meta)
    out = Path(args.out)
    stem = ("spec_trees" if args.trees else "spec") + ("" if args.workload == "sharegpt" else f"_{args.workload}")
    what = "Speculation controllers" + (" and token trees" if args.trees else "")
    if args.replay:
        stem, what = stem + "_replay", f"{what} (replay: {meta['profile']})"
    partial_file = partial_path(out, stem)
    done = resumed_cells(partial_file, args) if args.resume else []
    if not args.resume and partial_file.is_file():
        print(f"adactl bench spec: starting anew; the stopped run's cells in {partial_file} are replaced after this "
              "run's first cell (--resume keeps them)", file=sys.stderr)  # fmt: skip
    if done:
        cells = len({cell_key(r) for r in done})
        print(f"adactl bench spec: resuming {partial_file}: {cells} cell(s) done, kept as they are; the step-cost "
              "and acceptance estimators start again from their priors", file=sys.stderr)  # fmt: skip
    resumed = sorted({str(cell_key(r)) for r in done})

    def keep(records: list[dict[str, Any]]) -> None:  # every finished cell on disk: a stopped run keeps them
        add_ratios(records)
        write_json(partial_file, records, {**meta, "args": _settings(args), "complete": False,
                                           "resumed_cells": resumed})  # fmt: skip

    records = sweep(engines, prompts, ctx, chosen, oracles, args, done=done, on_cell=keep)
    add_ratios(records)
    print(format_table(records, TREE_COLUMNS if args.trees else COLUMNS))
    print(best_adaptive_summary(records))
    workload = {"humaneval": "HumanEval", "mixed": "held-out ShareGPT and HumanEval in turn"}.get(
        args.workload, "held-out ShareGPT"
    )
    write_json(out / f"{stem}.json", records, {**meta, "args": _settings(args), "resumed_cells": resumed})
    plot(records, out / f"{stem}.png", f"{what}, {workload}\n{meta['machine']['label']}")
    partial_file.unlink(missing_ok=True)
    return records


def _slo(args: SpecSettings, engines: Callable[[bool, int], Any], prompts: list[list[int]], ctx: RunContext,
         meta: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    from adactl.bench import slo

    records = slo.run(args, engines, prompts, ctx)
    cols = ["controller", "rate", "attainment", "attainment_tight", "attainment_medium", "attainment_loose",
            "slo_goodput", "tokens_per_s", "ratio_attainment_fixed"]  # fmt: skip
    print(format_table(records, cols))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / (("spec_slo_trees" if args.trees else "spec_slo") + ("_replay" if args.replay else "") + ".json"),
        records,
        {**meta, "args": _settings(args)},
    )
    return records


def _settings(args: SpecSettings) -> dict[str, Any]:
    """The run's settings as JSON values (tree specs as text)."""
    return {**asdict(args), "tree": str(args.tree), "fixed_trees": [str(t) for t in args.fixed_trees]}


def _trees(text: str) -> list[TreeSpec]:
    return [tree_spec(t) for t in text.split(";")]


@dataclass(frozen=True)
class SpecSettings(DeviceSettings, ProfileSettings):
    """`adactl bench spec` (and `--slo`, `--trees`)."""

    target: str = setting("smollm2", "target model spec")
    draft: str = setting("draft", "draft model spec")
    companion: str = setting("companion", "the companion (runs with sv)")
    # batches, ks and max_new_tokens: None (the mode's default) until `resolved`
    batches: list[int] = setting(None, "batch sizes, comma-separated (default 1,2,4,8,16,32,64; --replay "
                                 "1-256 in powers of 2; --quick 1,8,32)", parse=ints)  # fmt: skip
    temperatures: list[float] = setting([0.0, 0.7], "sampling temperatures, comma-separated", parse=floats)
    ks: list[int] = setting(None, "fixed draft lengths to run, any of 1..8 (default 1,2,4; --replay 1-6; "
                            "--quick 2,4)", parse=ints)  # fmt: skip
    sv_k: int = setting(6, "tokens drafted before SV chooses what to verify")
    controllers: list[str] | None = setting(None, "the stacks to run, ';'-separated (default: the docstring's; "
                                            "adactl stacks)", parse=stack_list)  # fmt: skip
    max_new_tokens: int = setting(None, "tokens generated per request (default 32; --replay 128; --quick 24 "
                                  "at most)", parse=int)  # fmt: skip
    max_prompt_tokens: int = setting(256, "prompts are clipped to this")
    rounds: int | None = setting(None, "runs per configuration, the fastest reported (default 2; 1 with --quick)",
                                 parse=int)  # fmt: skip
    seed: int = setting(0, "seed of prompts and sampling")
    quick: bool = setting(False, "batch 1, 8, 32; greedy; k = 2, 4; 24 tokens")
    tiny: bool = setting(False, "tiny random models (a smoke run)")
    slo: bool = setting(False, "the mixed-SLO workload under Poisson arrivals instead")
    rate: float = setting(2.0, "--slo: requests per second (--replay: 30)")
    slo_requests: int = setting(48, "--slo: requests in the run (--replay: 400)")
    slo_tpot: list[float] = setting([0.1, 0.2, 0.5], "--slo: TPOT bounds of the tight, medium and loose classes "
                                    "(seconds; --replay: 0.006, 0.009, 0.015)", parse=floats)  # fmt: skip
    slo_controllers: list[str] | None = setting(
        None,
        "--slo: stacks besides slo,adaserve (';'-separated; default "
        "no-spec;fixed-k2;fixed-k4;goodput;goodput-req;fixed-k{sv_k},sv)",
        parse=stack_list,
    )
    max_batch: int = setting(64, "--slo: requests served at once, at most")
    min_requests: int | None = setting(None, "requests each run serves at least, B at a time in waves (the next "
                                       "wave joins when the last request of the one before has finished; each "
                                       "wave's prefill step off the count; default 8: batch 1 serves 8 waves of 1, "
                                       "batch 4 two of 4, batch 8 and up one; --quick, --tiny, --replay and --slo "
                                       "1; --saturated N serves N x B instead)",
                                       parse=int)  # fmt: skip
    saturated: int = setting(0, "serve N x B requests, B at a time (a finished one replaced at once), tokens/s "
                             "counted while the batch is kept full: a loaded server's throughput (0: B requests "
                             "at once, to completion)")  # fmt: skip
    workload: str = setting("sharegpt", "prompts: held-out ShareGPT, HumanEval, or mixed (a chat and a code request "
                            "in turn)", choices=["sharegpt", "humaneval", "mixed"])  # fmt: skip
    trees: bool = setting(False, "token-tree controllers next to the chain controllers")
    # fixed_trees and tree: None (depth 2 and 4 of --tree-width, W nodes a level) until `resolved`
    fixed_trees: list[TreeSpec] = setting(None, "--trees: fixed trees to run, depth,width,nodes separated by ';' "
                                          "(default 2,W,2W;4,W,4W, W = --tree-width)", parse=_trees)  # fmt: skip
    tree: TreeSpec = setting(None, "--trees: the tree tree-alloc drafts (depth,width,nodes; default 2,W,2W)",
                             parse=tree_spec)  # fmt: skip
    tree_width: int = setting(2, "--trees: alternatives per level of goodput-tree and the tree controllers (the "
                              "replay's shipped tree traces: 2 or 4)")  # fmt: skip
    tree_extra_nodes: int = setting(0, "--trees: nodes goodput-tree and goodput-req-tree keep beyond --tree-width "
                                    "a level (the best by path value; at most every node the growth "
                                    "proposes)")  # fmt: skip
    profile_sv: str | None = setting(None, "the profile of runs with the companion (default: --profile, else "
                                     "this machine's)")  # fmt: skip
    replay: bool = setting(False, "no model runs: the profile replay (adactl.bench.spec_replay), step costs from "
                           "--profile (a computed GPU profile by name, e.g. h100-llama-3.1-8b); defaults: batch "
                           "1-256, k 1-6, 128 new tokens")  # fmt: skip
    replay_noise: float = setting(0.02, "--replay: log-sd of replayed step times")
    validate: bool = setting(False, "run the real engine and then the replay (this machine's profile, the shipped "
                             "traces) on the same requests, and report the replay's error")  # fmt: skip
    replay_traces: str = setting("shipped", "--replay: per-request acceptance traces: shipped (the default pair's "
                                 "recordings of --workload), none, or .npz files ';'-separated")  # fmt: skip
    replay_alpha: list[float] | None = setting(None, "--replay: one conditional acceptance by draft position for "
                                               "every request instead of traces", parse=floats)  # fmt: skip
    interleave: bool = setting(True, "run a round's configurations one after another instead of a step each in "
                               "turn (one engine's memory at a time; machine drift then separates them)")  # fmt: skip
    out: str = setting("bench_results", "directory for JSON and PNG")
    resume: bool = setting(False, "go on with a stopped run: the cells it finished (kept in --out's "
                           "spec*.partial.json after each cell) are kept, the others run; its settings must be "
                           "the same. Estimators the cells share (the step-cost model refined online, acceptance) "
                           "start again from their priors")  # fmt: skip

    def resolved(self) -> SpecSettings:
        """--quick, the mode's defaults of what was not given (the replay's are the GPU regime's:
        an explicit value stands even where it equals the engine's default), the default rounds
        and --slo's prompt count applied."""
        s = self
        if s.quick:  # an explicit --rounds stands (single rounds here differ by up to 10%)
            quick = min(s.max_new_tokens or 24, 24)
            s = replace(s, batches=[1, 8, 32], temperatures=[0.0], ks=[2, 4], max_new_tokens=quick)
        base = SpecSettings()
        if s.batches is None:
            s = replace(s, batches=[1, 2, 4, 8, 16, 32, 64, 128, 256] if s.replay else [1, 2, 4, 8, 16, 32, 64])
        if s.ks is None:
            s = replace(s, ks=[1, 2, 3, 4, 5, 6] if s.replay else [1, 2, 4])
        if s.max_new_tokens is None:
            s = replace(s, max_new_tokens=128 if s.replay else 32)
        if s.rounds is None:
            s = replace(s, rounds=1 if s.quick or s.replay else 2)
        if s.min_requests is None:
            s = replace(s, min_requests=1 if s.quick or s.tiny or s.replay or s.slo else DEFAULT_MIN_REQUESTS)
        if s.tree_width < 2:
            raise SystemExit(f"adactl bench spec --tree-width: at least 2 alternatives a level, got {s.tree_width}")
        if s.tree_extra_nodes < 0:
            raise SystemExit(f"adactl bench spec --tree-extra-nodes: 0 or more, got {s.tree_extra_nodes}")
        w = s.tree_width
        if s.fixed_trees is None:
            s = replace(s, fixed_trees=[TreeSpec(2, w, 2 * w), TreeSpec(4, w, 4 * w)])
        if s.tree is None:
            s = replace(s, tree=TreeSpec(2, w, 2 * w))
        if s.min_requests is not None and s.min_requests < 1:
            raise SystemExit(f"adactl bench spec --min-requests: at least 1, got {s.min_requests}")
        if s.replay and s.slo:  # the GPU regime's scale: milliseconds per token, tens of requests a second
            if s.slo_tpot == base.slo_tpot:
                s = replace(s, slo_tpot=list(REPLAY_SLO_TPOT))
            if s.rate == base.rate:
                s = replace(s, rate=REPLAY_SLO_RATE)
            if s.slo_requests == base.slo_requests:
                s = replace(s, slo_requests=REPLAY_SLO_REQUESTS)
        if s.slo:
            default = ["no-spec", "fixed-k2", "fixed-k4", "goodput", "goodput-req", f"fixed-k{s.sv_k},sv"]
            s = replace(s, batches=[s.slo_requests], slo_controllers=s.slo_controllers or default)  # prompts needed
        return s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, SpecSettings)
