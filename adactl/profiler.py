"""`adactl profile`: measure what engine steps cost on this machine, and find the profile a run uses.

    adactl profile                                  # the default pair, on auto device, float32
    adactl profile --device cuda --dtype bfloat16   # another machine is another profile
    adactl profile --draft none                     # the target alone (streaming serves plain)

`measure` grows one batch (1, 2, 4, ... `--max-batch` requests of random prompts, prefilled
in chunks: those are the prefill samples), and runs rounds of whole-batch steps at each
batch size, every draft length (0, 1, 2, 3, 4, 6, 8; where a round grows long, 0, 1, 2, 4, 8)
once per round in a shuffled order, at least 4 rounds, more while a size's ratios of a k-token
step to a plain one are less precise than 3% (`TARGET_SE`): those ratios, which goodput decides
on, are fitted on them (the profile's surface, adactl.estimators.cost_surface). One round at
each size as the batch grows, with a few steps verifying a random prefix per row and a few
with only a few rows drafting (verify controllers' and SLO plans' shapes, for the basis); the
other rounds in shuffled passes over every size, a smaller batch running the first rows of
the grown one, so that every size is measured across the whole run, not in a window of its
own. At least 4 rounds everywhere: one round's k-step ÷ plain ratio spreads 10-15% around its
median on a CPU (measured on the 2-core AVX2 CPU), and the 2 rounds that 10 s held at batch
32-64 left the profile pricing drafting 10-17% low there (issue 30). The rounds past the 4th
stop at its time budget (300 s by default: on the 2-core AVX2 CPU this reaches batch 64 with
4 rounds there, about 4 minutes in all with loading; on a GPU it takes seconds); the 4 are
measured whatever the budget (a VM 1.5-1.9x slower left run 57's profile at 3 rounds at batch
8-64, its ratios off by about 9%). Then it fits the cost basis and saves the profile under
`$ADACTL_CACHE/profiles/<fingerprint key>.json`, with each size's rounds and the precision
they reached (`meta["rounds"]`, `meta["ratio_se"]`).

`adactl profile --check` measures nothing into the profile: held-out rounds on new rows at each batch
size, the measured ratio of each k-token step to a plain one (the median over rounds of a
round's ratio, with its standard error) next to the profile's, and which errors exceed what
the check itself can resolve. `--profile this,shipped,FILE` prices the very same held-out steps
with each profile named, so profiles are compared side by side in one run, not across runs a
drifting machine makes incomparable.

`step_cost_for` is what benches, the server and the envs call: the profile that matches this
machine, created on first use (a progress bar and one line saying so); or a file named with
`--profile`, which is used even if it was made elsewhere (training on this CPU against a
GPU's costs), but never silently: a line names what differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from adactl import settings
from adactl.estimators.step_cost import Fingerprint, ProfileError, StepCostModel, StepCostProfile
from adactl.estimators.step_time import StepShape
from adactl.runtime.shapes import context_of
from adactl.settings import DeviceSettings, ints, setting

DRAFT_LENGTHS = (0, 1, 2, 3, 4, 6, 8)


def fingerprint(specs: dict[str, str], device: torch.device | str, dtype: torch.dtype) -> Fingerprint:
    """The fingerprint of these models on this machine (device, dtype, torch, threads)."""
    from adactl.runtime.device import describe

    m = describe(device, dtype)
    return Fingerprint(specs.get("target", "?"), specs.get("draft", "none") or "none",
                       specs.get("companion", "none") or "none", m.device_type, m.device_name, m.dtype, m.torch,
                       m.threads)  # fmt: skip


def profile_dir() -> Path:
    from adactl.runtime.models import cache_dir

    return cache_dir() / "profiles"


def cached_path(fp: Fingerprint) -> Path:
    """Where the profile of `fp` made by this engine is cached: a profile of another version of
    the engine's code is never picked up (`engine_version`)."""
    return profile_dir() / f"{fp.key()}-{engine_version()}.json"


@functools.cache
def engine_version() -> str:
    """A digest of the engine's source (`adactl.runtime`'s modules) and of this module's (what
    it measures). A profile prices the engine's steps, and those move with its code (padding
    2-3 rows of the CPU's float32 `linear` cut batch-1 steps by 18-25%; issue 31's host path
    halved its overhead), so a profile cached by an earlier version would price steps that no
    longer run: after an upgrade the first run measures again. The same for the profiler's
    own changes (the rows it renews past `max_context`, 2026-12-05)."""
    import adactl.runtime as runtime

    digest = hashlib.sha256()
    for path in [*sorted(Path(runtime.__file__).parent.glob("*.py")), Path(__file__)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:8]


MAX_CONTEXT = 384
"""A profile's rows are renewed past this context (`measure`); 1.5x the benches' longest prompt."""

TARGET_SE = 0.03
"""`measure` adds rounds at a batch size until its k-step ÷ plain ratios are this precise (the
standard error of their medians, `ratio_se`), within its budget and `reps`. On the 2-core AMD
EPYC (AVX2) a step's time is white noise of about 10% (log sd; consecutive steps share none of
it) and a round's k = 1 ÷ plain ratio spreads 10-14%, so a ratio from 3 rounds is off by about 9%
(run 57's profile at batch 8-64: k = 1 at batch 64 1.49 where 24-round checks measured
1.64-1.71, `docs/issue30/span_ratio`), from 12 by 4%; on the Intel Xeon of runs 53-55, whose
profiles checked within 5% at 20-21 of 21 ratios, 4-6 rounds did."""

REPS = 24
"""`measure`'s most rounds at a batch size (`TARGET_SE` decides how many it takes)."""


def ratio_se(rounds: list[dict[int, float]]) -> float:
    """The standard error of a batch size's k-step ÷ plain ratios (as a median's, 1.25 σ / √n,
    in log), σ pooled over the draft lengths from their rounds' spread: `rounds`, one
    {k: ratio} a round. Infinite below two rounds; 0 where nothing drafts (no ratio to resolve)."""
    ks = {k for r in rounds for k in r}
    if not ks and rounds:
        return 0.0
    squares, dof = 0.0, 0
    for k in ks:
        logs = np.log([r[k] for r in rounds if k in r])
        if len(logs) >= 2:
            squares += float(np.sum((logs - logs.mean()) ** 2))
            dof += len(logs) - 1
    if dof == 0:
        return math.inf
    return 1.2533 * math.sqrt(squares / dof) / math.sqrt(len(rounds))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(engine: Any, device: torch.device, vocab: int, max_batch: int = 64, budget_s: float = 300.0,
            reps: int = REPS, seed: int = 0, max_k: int = 8, progress: bool = True, batch_seconds: float = 10.0,
            min_rounds: int = 4, stats: dict[str, Any] | None = None, max_context: int = MAX_CONTEXT,
            target_se: float = TARGET_SE) -> tuple[list[StepShape], np.ndarray]:  # fmt: skip
    """Shapes and [N, 3] prefill/draft/verify seconds of steps on `engine` (see the module docstring).
    A step that captured a CUDA graph is left out (`stats["captures"]` counts them).

    A round at batch size b: whole-batch steps on b rows, every draft length once in a shuffled
    order (a round's steps run within seconds of each other, so drift hits every length alike;
    the ratios the profile's surface holds are fitted on them); where a round would take over
    a third of `batch_seconds`, the lengths 0, 1, 2, 4, 8 only. The batch grows (1, 2, 4, ...)
    with one round at each size, then one step per draft length 1, 2, 4, 8 verifying a random
    prefix per row, and one with only a few rows drafting (the shapes verify controllers and
    SLO plans make, for the basis). Then the remaining rounds in passes over every batch size
    in a shuffled order: `min_rounds` at every size whatever the budget, then more at a size
    while the standard error of its k-step ÷ plain ratios, from its rounds' spread
    (`ratio_se`), exceeds `target_se` (3%), up to `reps` rounds, until the budget is spent; a
    smaller batch runs the first b rows (`StepPlan.run`;
    the others wait, costing nothing): each size's rounds spread over the whole measurement,
    so every size is priced at the machine's mean speed over it, not at whatever it ran at
    during a few seconds of its own (the 2-core CPU's memory bandwidth moves 12-20 GB/s from
    second to second, and one profile priced its one-row steps at 70 ms where the same code
    took 100-145 ms an hour later, issue 32).

    A row whose context passes `max_context` (1.5x the benches' longest prompt) is replaced
    by a new prompt before the next round. Without that the first rows, which every batch
    size runs, aged to 450-900 tokens, and a step's attention spans the cache's widest row
    (the engine's padded rectangle, adactl.runtime.kv): at batch 32 one 800-token row among
    rows of 16-256 tokens made a plain step 59% slower for 9% more context, and put k = 4 at
    2.17x a plain step against 2.57x (`docs/issue30/width/width.py`). So a profile priced
    k-token steps against plain ones at contexts no server batch of short requests holds: the
    profile that measured 12 rounds a size (rows up to 900 tokens) put them 10-22% too cheap
    against held-out steps. For the same reason each round starts from a packed cache
    (`Engine.pack`): the holes earlier rounds' drafts left (compaction waits until they waste
    a quarter of the columns) made the profile's plain steps at batch 32 cost 155 ms against
    131 ms packed, and priced k = 4 at 1.98x a plain step where new rows pay 2.6-3.0x. The first
    step after a pack is slower (plain steps at batch 2: 40 against 36 ms; 42-48 against 36-38
    in the profiles of make bench runs 24-25, in the rounds where it was the plain one), so an
    untimed step runs first: without it, a profile priced k-token steps at batch 2 2-7% too
    cheap against held-out steps in the same process, with it within 2% (`docs/issue30/first_step`).
    Each round at a size below half the rows also runs plain steps on the youngest and the
    oldest rows (`spans`): the engine's attention spans a step's widest row (`StepShape.span_tokens`,
    the cost basis's KV span), and the rounds' first b rows always hold one of the oldest, so
    without them the fit could not tell a token of span from a row (a profile of the 2-core CPU
    priced a token of context at 12 us against the engine's 3, and streaming steps, whose rows
    are shorter, 15% low, issue 32). Every round ends with a few plain steps and one drafting
    a token (`catchup`): the draft's catch-up on a stretch without drafting (the cost basis's
    draft catch-up).
    A profile prices the process it runs in: `make bench`'s, made after the bench had read and
    tokenized its prompts in-process, priced k-token steps at batch 4 16-18% dearer than a clean
    process's held-out steps, and so did that process's steps (its prompts are built in a child
    since, `adactl.workloads.built_apart`; this paragraph's edit also retires the profiles cached
    before, `engine_version`).
    Against held-out steps on new rows (`--check`, two checks each), four profiles of this
    profiler have 3.1-6.4% mean error and 11-17 of 21 ratios within 5%; the profiler before,
    6.2-6.9% and 9-10 (docs/bench_spec.md, 2026-12-05). What is left is each profile's own
    cell noise (6 steps a cell at batch 1-16).

    On the CPU `make_profile` reserves the engine's KV first (`Engine.reserve`), as the bench
    reserves its runs' (`adactl.bench.spec.Engines`): a cache that grows copies itself, 90-900 ms
    at batch 64 of the default pair, and a k-token step widens it by k + 1 columns, so one k = 4
    step in three or four paid for a copy, at random (k = 4 at batch 64: 501-735 ms, and 925,
    964, 1,584 ms in the steps that copied; reserved, 534-683 ms: `docs/issue30/kv_growth`)."""
    from adactl.runtime import SamplingParams, StepPlan

    rng = random.Random(seed)
    ks = [k for k in DRAFT_LENGTHS if k <= max_k] if getattr(engine, "draft", None) is not None else [0]
    short = [k for k in ks if k in (0, 1, 2, 4, 8)]
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch] or [1]
    shapes: list[StepShape] = []
    seconds: list[tuple[float, float, float]] = []
    skipped = stats if stats is not None else {}
    skipped["captures"] = 0
    start = time.perf_counter()
    sampling = SamplingParams(max_new_tokens=4096, stop_on_eos=False)

    def captures() -> int:
        return int(engine.graph_stats()["captures"]) if hasattr(engine, "graph_stats") else 0

    def step(plan: Any, cut_mode: int = 0) -> float:
        before = captures()
        drafts = engine.draft_step(plan)
        cut = drafts.draft_len.clone()
        if cut_mode == 1:
            cut = torch.tensor([rng.randint(0, int(n)) for n in drafts.draft_len], dtype=torch.long)
        outcome = engine.verify(cut)
        _sync(device)
        if captures() != before:  # it captured a CUDA graph: its time is the capture's, not a step's
            skipped["captures"] += 1  # (80-700 ms against 9-40 ms steps on an H200 at the 8B shape)
            return float(outcome.total_s)
        context, span = context_of(drafts.context_len)
        shapes.append(StepShape.of_lengths(cut, drafts.draft_len, int(outcome.prefill_tokens), context,
                                           outcome.prefill_attention, span=span,
                                           moved=outcome.moved_tokens, catchup=outcome.catchup_tokens))  # fmt: skip
        seconds.append((outcome.prefill_s, outcome.draft_s, outcome.verify_s))
        return float(outcome.total_s)

    def fill(n: int) -> None:
        """n requests running: new prompts for any that ended or outgrew `max_context` (a
        profile's rows otherwise age to many times the contexts a server's rows hold, the
        first rows most, since every batch size runs them), prefilled in chunks."""
        old = [v.request_id for v in engine.requests() if v.context_len > max_context]
        for rid in old:
            engine.cancel(rid)
        while len(engine.requests()) < n:
            size = rng.randint(16, min(256, 2 * max_context // 3))  # as long as the benches' (their prefill)
            engine_ids.append(engine.add_request([rng.randrange(1, vocab) for _ in range(size)], sampling))
        while any(v.status != "running" for v in engine.requests()):
            step(StepPlan(draft_len=0, prefill_budget=rng.choice([256, 512, 1024])))
        engine.pop_finished()
        if old:  # the rows moved: an untimed step pays for compacting the cache, not the round's first
            engine.draft_step(StepPlan(draft_len=0, prefill_budget=0))
            engine.verify()

    def first_rows(b: int) -> list[str] | None:
        """The rows a step at batch size b runs: the first b (a row may end mid-round: each step asks)."""
        running = [v.request_id for v in engine.requests() if v.status == "running"]
        return running[:b] if b < len(running) else None

    def one_round(b: int) -> float:
        fill(grown)
        engine.pack()  # each round from a packed cache (module docstring), then an untimed step pays for the move
        engine.draft_step(StepPlan(draft_len=min(1, max(ks)), prefill_budget=0, run=first_rows(b)))
        engine.verify()
        took = {k: step(StepPlan(draft_len=k, prefill_budget=0, run=first_rows(b)))  # the first b rows run,
                for k in rng.sample(lengths[b], len(lengths[b]))}  # the others wait  # fmt: skip
        if took.get(0, 0.0) > 0:
            ratios.setdefault(b, []).append({k: t / took[0] for k, t in took.items() if k > 0 and t > 0})
        return sum(took.values()) + spans(b) + renew() + catchup(b)

    def catchup(b: int) -> float:
        """A few plain steps on the round's rows, then one drafting a token: the draft's first
        forward feeds every token the rows emitted since they last drafted
        (`StepShape.catchup_tokens`, the cost basis's draft catch-up), which the round's own
        steps (a plain step at most before each drafting one) barely vary. Small batches take
        the longer stretches: a column costs alike at every batch size (0.03 ms on the 2-core
        CPU, `docs/issue30/catchup`), and their steps are cheap."""
        if max(ks) == 0:
            return 0.0
        plain = rng.choice((4, 16) if b <= 8 else (2, 4))
        total = sum(step(StepPlan(draft_len=0, prefill_budget=0, run=first_rows(b))) for _ in range(plain))
        return total + step(StepPlan(draft_len=1, prefill_budget=0, run=first_rows(b)))

    def renew() -> float:
        """One row replaced by a new prompt, prefilled in one chunk beside the running rows: a
        prefill sample in every round, so the prefill part is priced at the machine's mean speed
        over the measurement like every batch size (module docstring). Prefill samples came from
        the batch's growth alone before, 18 steps in its first seconds: two profiles made 17
        minutes apart priced the same chunks 15-30% apart, and a streaming replay's first
        tokens with them (issue 32)."""
        running = [v.request_id for v in engine.requests() if v.status == "running"]
        if not running:
            return 0.0
        engine.cancel(rng.choice(running))
        size = rng.randint(16, min(256, 2 * max_context // 3))  # as fill's
        engine_ids.append(engine.add_request([rng.randrange(1, vocab) for _ in range(size)], sampling))
        seconds = step(StepPlan(draft_len=0, prefill_budget=size))
        engine.pop_finished()
        return seconds

    def spans(b: int) -> float:
        """Plain steps on the b youngest and the b oldest rows, in a random order, each from a
        packed cache after an untimed step that moves its rows (module docstring): the same
        batch size at two attention spans, a few seconds apart, so the fit can tell what a
        token of span costs from what a row does (the rounds' first b rows always hold one of
        the oldest). Then each set with a quarter of its rows swapped for the next in age: a
        step that moves rows (a deferral's KV copies, `kv_moved`) at the same span."""
        if 2 * b > grown:
            return 0.0

        def alive(rows: list[str]) -> list[str] | None:  # (a row may end mid-round: each step asks; none: all)
            running = {v.request_id for v in engine.requests() if v.status == "running"}
            return [r for r in rows if r in running] or None

        by_age = sorted((v for v in engine.requests() if v.status == "running"), key=lambda v: v.context_len)
        ids = [v.request_id for v in by_age]
        m = max(1, b // 4)
        total = 0.0
        for run, swapped in rng.sample([(ids[:b], ids[m : b + m]), (ids[-b:], ids[-b - m : -m])], 2):
            engine.pack()  # (a row that ran beside a longer one spans its columns until packed)
            engine.draft_step(StepPlan(draft_len=0, prefill_budget=0, run=alive(run)))
            engine.verify()
            total += step(StepPlan(draft_len=0, prefill_budget=0, run=alive(run)))
            total += step(StepPlan(draft_len=0, prefill_budget=0, run=alive(swapped)))
        return total

    def over() -> bool:
        return time.perf_counter() - start > budget_s

    partial = [k for k in short if k > 0]
    lengths: dict[int, list[int]] = {}
    cost: dict[int, float] = {}  # seconds of one round at each size
    floor = min(min_rounds, reps)
    ratios: dict[int, list[dict[int, float]]] = {}  # each size's rounds: k-step ÷ the round's plain step, by k
    bar = tqdm(total=len(batches) * floor, desc="adactl profile", unit="round", disable=not progress)
    engine_ids: list[str] = []
    last_round = 0.0
    grown = 0  # rows the engine holds: the largest size grown to
    for i, b in enumerate(batches):  # grow the batch, one round at each size
        grown = b
        fill(b)  # new rows prefill in chunks next to the running rows
        for j in range(8 if i == 0 else 2):  # warm-up (the first batch size: the process's first steps too)
            engine.draft_step(StepPlan(draft_len=j % 2 if ks != [0] else 0, prefill_budget=0))
            engine.verify()
        lengths[b] = ks if 2 * last_round <= batch_seconds / 3 else short  # a round costs about twice the last
        cost[b] = one_round(b)
        last_round = cost[b] * len(ks) / len(lengths[b])
        for k in rng.sample(partial, len(partial)) if b > 1 and not over() else []:
            fill(b)
            step(StepPlan(draft_len=k, prefill_budget=0), cut_mode=1)  # a random prefix of each row
            running = [v.request_id for v in engine.requests()]
            few = rng.randint(1, max(1, b // 4))  # a few rows draft k, the rest 0 or 1
            step(StepPlan(draft_len={r: k if j < few else rng.randint(0, 1) for j, r in enumerate(running)},
                          prefill_budget=0))  # fmt: skip
        bar.update(1)
        # grow no further once the passes that give every size grown so far its minimum of
        # rounds would not fit the budget (larger sizes measured once are worth less)
        if over() or time.perf_counter() - start + (min_rounds - 1) * sum(cost.values()) > budget_s:
            bar.write(f"adactl profile: time budget ({budget_s:.0f} s) reached at batch {b}")
            break
    rounds = dict.fromkeys(cost, 1)

    def wants(b: int) -> bool:  # its minimum, then rounds while its ratios are not resolved and time is left
        resolved = ratio_se(ratios.get(b, [])) <= target_se
        return rounds[b] < floor or (rounds[b] < reps and not resolved and not over())

    bar.total = len(rounds) * floor
    bar.refresh()
    while any(wants(b) for b in rounds):  # passes over every size, shuffled
        for b in rng.sample(list(rounds), len(rounds)):
            if wants(b):
                one_round(b)
                rounds[b] += 1
                bar.total = max(bar.total, sum(max(r, floor) for r in rounds.values()))
                bar.update(1)
    se = {b: ratio_se(ratios.get(b, [])) for b in rounds}
    bar.set_postfix_str(" ".join(f"{b}:{r}" for b, r in rounds.items()))
    bar.close()
    skipped["rounds"] = dict(rounds)
    skipped["ratio_se"] = {b: round(v, 4) if math.isfinite(v) else None for b, v in se.items()}
    for rid in engine_ids:
        engine.cancel(rid)
    engine.draft_step(StepPlan(draft_len=0, prefill_budget=0))
    engine.verify()
    engine.pop_finished()
    return shapes, np.array(seconds, dtype=np.float64)


def make_profile(pair: Any, max_batch: int = 64, budget_s: float = 300.0, reps: int = REPS, seed: int = 0,
                 progress: bool = True) -> StepCostProfile:  # fmt: skip
    """Measure `pair` (a `ModelPair`) on its device and fit its step-cost profile."""
    from adactl.runtime import Engine, EngineConfig, freeze_heap
    from adactl.runtime.models import output_vocab_size

    freeze_heap()  # a full collection of the loaded models' objects is a 200 ms step the fit would learn
    fp = fingerprint(pair.model_ids, pair.device, pair.dtype)
    draft = pair.speculator(with_companion=pair.companion is not None)
    engine = Engine(pair.target.model, draft, config=EngineConfig(max_batch_size=max_batch, seed=seed))
    if engine.graphs is not None:  # every row up front: each growth of the batch would drop every graph
        engine.reserve(max_batch, 1)  # (columns still grow with the contexts, doubling)
    else:  # the KV reserved, as `adactl bench spec` reserves its runs': no step pays for a growth
        engine.reserve(max_batch, MAX_CONTEXT + 128)  # (a row's context, then a round's drafts before a pack)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    stats: dict[str, Any] = {}
    shapes, seconds = measure(engine, pair.device, output_vocab_size(pair.target.model), max_batch, budget_s, reps,
                              seed, progress=progress, stats=stats)  # fmt: skip
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "profile_s": round(time.perf_counter() - t0, 1),
            "max_batch": max_batch, "reps": reps, "seed": seed, "steps": len(shapes),
            "steps_left_out_capturing": stats["captures"], "engine": engine_version(),
            "rounds": {str(b): n for b, n in stats["rounds"].items()},
            "ratio_se": {str(b): v for b, v in stats["ratio_se"].items()}}  # fmt: skip
    return StepCostProfile.from_steps(fp, shapes, seconds, meta)


def shipped_profile(specs: dict[str, str]) -> Path:
    """The CPU profile shipped for this kind of pair (draft alone, with companion, or none): the
    fallback prior, made with `adactl profile` on the 2-core CPU this project builds on."""
    from adactl.runtime.models import SHIPPED_MODELS

    if specs.get("draft", "none") == "none":
        name = "step_cost_cpu_plain.json"
    elif specs.get("companion", "none") != "none":
        name = "step_cost_cpu_companion.json"
    else:
        name = "step_cost_cpu.json"
    return SHIPPED_MODELS / "estimators" / name


def gpu_profile_path(name: str) -> Path:
    """Where the computed GPU profile `name` (adactl.estimators.gpu_cost.SHIPPED) is shipped."""
    from adactl.runtime.models import SHIPPED_MODELS

    return SHIPPED_MODELS / "estimators" / f"gpu_{name}.json"


def named_profile(profile: str | Path) -> str | Path:
    """A shipped computed GPU profile's path for its name (`h100-llama-3.1-8b`, ...); anything
    else as it is (a file)."""
    from adactl.estimators.gpu_cost import SHIPPED

    return gpu_profile_path(str(profile)) if str(profile) in SHIPPED else profile


def step_cost_for(pair: Any, profile: str | Path | None = None, refine: bool = True, max_batch: int = 64,
                  budget_s: float = 300.0, log: Any = None) -> StepCostModel:  # fmt: skip
    """The step-cost model a run on `pair` uses (see the module docstring); `profile="shipped"`:
    the shipped CPU profile as the prior, with nothing measured."""
    say = log or (lambda text: print(text, file=sys.stderr))
    here = fingerprint(pair.model_ids, pair.device, pair.dtype)
    if profile == "shipped":
        profile = shipped_profile(pair.specs)
    if profile is not None:
        profile = named_profile(profile)
        loaded = StepCostProfile.load(profile)
        diff = here.differences(loaded.fingerprint)
        if diff:
            how = ", refined online from every step" if refine else " (online refinement off)"
            say(
                f"adactl: step-cost profile {profile} was made for another setup ({'; '.join(diff)}); "
                f"using it as the prior{how}"
            )
        return loaded.model(refine=refine, foreign=bool(diff))
    path = cached_path(here)
    if path.is_file():
        try:
            return StepCostProfile.load(path).model(refine=refine)
        except ProfileError as e:
            say(f"adactl: ignoring the cached profile ({e})")
    say(f"adactl: no step-cost profile for {here.machine_label} ({here.target} + {here.draft}"
        f"{' + ' + here.companion if here.companion != 'none' else ''}); measuring one (at most {budget_s:.0f} s) "
        f"-> {path}")  # fmt: skip
    made = make_profile(pair, max_batch=max_batch, budget_s=budget_s)
    made.save(path)
    say(f"adactl: {precision_line(made.meta)}")
    return made.model(refine=refine)


@dataclass(frozen=True)
class ProfilerSettings(DeviceSettings):
    """`adactl profile`."""

    target: str = setting("smollm2", "target model spec (default: SmolLM2-135M-Instruct)")
    draft: str = setting("draft", "draft spec, or none")
    companion: str = setting("none", "companion spec (SV's signal), or none")
    max_batch: int = setting(64, "the largest batch measured")
    budget_s: float = setting(300.0, "time budget of the measurement")
    reps: int = setting(REPS, "rounds of whole-batch steps per batch size, at most (each: every draft length "
                        "once; rounds are added while a size's ratios are less precise than 3%)")  # fmt: skip
    seed: int = setting(0, "seed of the measured requests")
    out: str | None = setting(None, "also write the profile here (it is always cached)")
    tiny: bool = setting(False, "tiny random models (a smoke run)")
    shape: str | None = setting(None, "random weights of a named model shape (adactl bench step's: smollm2-135m, "
                                "llama-3.1-8b, tiny) with a random feature draft, instead of --target and --draft: "
                                "a GPU's step costs at a real shape without its weights")  # fmt: skip
    check: bool = setting(False, "measure nothing new: check the profile this machine uses (or --profile) against "
                          "held-out whole-batch steps, the ratio of each k-token step to a plain one")  # fmt: skip
    check_batches: list[int] = setting([1, 2, 4, 8, 16, 32, 64], "--check: batch sizes", parse=ints)
    check_ks: list[int] = setting([1, 2, 4], "--check: draft lengths compared with plain decoding", parse=ints)
    check_rounds: int = setting(5, "--check: rounds per batch size (each: every length once, shuffled)")
    profile: str | None = setting(None, "--check: this profile file instead of this machine's; several, "
                                  "comma-separated, are checked on the same steps ('this': this machine's, "
                                  "'shipped': the shipped CPU one)")  # fmt: skip
    computed: str | None = setting(None, "measure nothing: write a GPU profile computed from the hardware's figures "
                                   "and the model's shape (adactl.estimators.gpu_cost): a shipped name "
                                   "(h100-llama-3.1-8b, a100-llama-3.1-8b, h200-llama-3.1-8b, "
                                   "h100x4-llama-3.1-70b), 'all' (every shipped one, into the shipped directory), "
                                   "or GPU:MODEL[:TP] (names, or JSON files of their fields)")  # fmt: skip
    draft_fraction: float | None = setting(None, "--computed: one draft forward's cost / the target's linear "
                                           "layers (default: an EAGLE head in vLLM, 0.112; a 135M draft model "
                                           "under transformers about 0.36)", parse=float)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, ProfilerSettings)


def main(namespace: argparse.Namespace) -> StepCostProfile:
    return run(settings.from_args(ProfilerSettings, namespace))


def run(args: ProfilerSettings) -> StepCostProfile | list[dict[str, Any]] | list[StepCostProfile]:
    from adactl.runtime.device import device_and_dtype
    from adactl.runtime.models import load_pair

    if args.max_batch < 1 or args.budget_s <= 0 or args.reps < 1 or args.check_rounds < 2:
        raise SystemExit("adactl profile: --max-batch and --reps must be >= 1, --check-rounds >= 2 and --budget-s > 0")
    if args.computed is not None:
        return run_computed(args.computed, args.out, args.draft_fraction)
    device, dtype = device_and_dtype(args.device, args.dtype)  # before any model loads
    if args.tiny:
        pair = tiny_pair(device, dtype)
    elif args.shape:
        pair = shape_pair(args.shape, device, dtype)
    else:
        pair = load_pair(args.target, args.draft, args.companion, device, dtype)
    if args.check:
        return run_check(pair, args)
    made = make_profile(pair, args.max_batch, args.budget_s, args.reps, args.seed)
    path = made.save(cached_path(made.fingerprint))
    if args.out:
        made.save(args.out)
    left_out = made.meta.get("steps_left_out_capturing", 0)
    print(f"{made.meta['steps']} steps in {made.meta['profile_s']} s on {made.fingerprint.machine_label}"
          + (f" ({left_out} left out: they captured CUDA graphs)" if left_out else "") + "; "
          f"fit error {100 * made.meta['fit_mape']:.1f}% (mean absolute, relative; the basis alone "
          f"{100 * made.meta['basis_mape']:.1f}%) -> {path}" + (f" and {args.out}" if args.out else ""))  # fmt: skip
    print(precision_line(made.meta))
    return made


def precision_line(meta: dict[str, Any]) -> str:
    """Rounds at each batch size and how precise its k-step ÷ plain ratios are (`ratio_se`)."""
    se = meta.get("ratio_se", {})
    sizes = ", ".join(f"{b}: {n} ({'?' if se.get(b) is None else f'{100 * se[b]:.1f}%'})"
                      for b, n in meta.get("rounds", {}).items())  # fmt: skip
    return (f"rounds at each batch size (the standard error of its k-step / plain ratios; {100 * TARGET_SE:.0f}% "
            f"sought): {sizes}")  # fmt: skip


def run_computed(what: str, out: str | None = None, draft_fraction: float | None = None) -> list[StepCostProfile]:
    """`adactl profile --computed`: compute, save and summarise GPU profiles (module
    adactl.estimators.gpu_cost); `out`: the file (one profile) or directory ('all')."""
    from adactl.bench.common import format_table
    from adactl.estimators import gpu_cost

    names = list(gpu_cost.SHIPPED) if what == "all" else [what]
    made = []
    for name in names:
        if name in gpu_cost.SHIPPED:
            gpu, model, tp = gpu_cost.SHIPPED[name]
        else:
            gpu, _, rest = name.partition(":")
            model, _, tp_text = rest.partition(":")
            if not gpu or not model or (tp_text and not tp_text.isdigit()):
                shipped = ", ".join(gpu_cost.SHIPPED)
                raise gpu_cost.GpuCostError(f"--computed {name!r}: give a shipped name ({shipped}), 'all', or "
                                            "GPU:MODEL[:TP], e.g. h100:llama-3.1-70b:4")  # fmt: skip
            tp = int(tp_text or 1)
        cost = gpu_cost.gpu_cost(gpu, model, tp, draft_fraction)
        profile = gpu_cost.computed_profile(cost)
        if what == "all":
            path = Path(out) / f"gpu_{name}.json" if out else gpu_profile_path(name)
        else:
            path = Path(out) if out else profile_dir() / "computed" / f"gpu_{cost.name}.json"
        profile.save(path)
        made.append(profile)
        flat = ", ".join(f"{b} (k = {k})" for k, b in gpu_cost.flat_batches(cost).items())
        print(f"{cost.name}: knee {cost.knee:.0f} tokens, weights read in {1000 * cost.weight_s:.2f} ms; verifying "
              f"k + 1 tokens costs <= 5% more than one up to batch {flat}; profile fit error "
              f"{100 * profile.meta['fit_mape']:.1f}% -> {path}")  # fmt: skip
    columns = ["gpu", "model", "batch", "K", "published_ms", "predicted_ms", "error", "profile_ms", "profile_error",
               "source"]  # fmt: skip
    print("calibration: published step times of Llama-3.1-8B next to the computed ones")
    print(format_table(gpu_cost.calibration_table(), columns))
    print("checks, another engine: transformers' forward replayed as a CUDA graph on an H100 (../shared/measurements)")
    print(format_table(gpu_cost.calibration_table(gpu_cost.MEASURED, profiles=False), columns[:7] + ["source"]))
    return made


def check_ratios(pair: Any, models: Any, batches: list[int], ks: list[int], rounds: int = 5, seed: int = 1,
                 progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """Held-out whole-batch steps at each batch size, on new rows there (prompts of 16-256
    tokens, as a bench's batch), `rounds` rounds of plain decoding and every k in `ks` in a
    shuffled order: the measured ratio of a k-token step to a plain one
    (the median over rounds of the round's k-step ÷ its plain step, so drift between rounds
    cancels) and its relative standard error (of a median: 1.25 σ / √n of the rounds' log
    ratios), next to each model's for the same steps' shapes (their mean prediction). `models`:
    one step-cost model, or {name: model} to compare profiles on the same steps (a record per
    name, its `profile`). An error within twice the standard error is one the check cannot
    tell from its own noise."""
    from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, freeze_heap
    from adactl.runtime.models import output_vocab_size

    if rounds < 2:
        raise ValueError(f"a check needs at least 2 rounds for its standard error, got {rounds}")
    named = models if isinstance(models, dict) else {"profile": models}
    rng = random.Random(seed)
    engine = Engine(pair.target.model, pair.speculator(with_companion=pair.companion is not None),
                    config=EngineConfig(max_batch_size=max(batches), seed=seed))  # fmt: skip
    longest = 256  # the prompts' longest, as a bench clips them
    if engine.graphs is None:  # the KV reserved, as the profiler's and a bench's: no step pays for a growth
        per_round = sum(k + 1 for k in (0, *ks))  # the columns a round's steps add at most, holes included
        engine.reserve(max(batches), longest + per_round + 4 + rounds * per_round)  # (the warm-up: 1, 1, 0, *ks)
    vocab, sampling = output_vocab_size(pair.target.model), SamplingParams(max_new_tokens=4096, stop_on_eos=False)
    records: list[dict[str, Any]] = []
    freeze_heap()  # as make_profile
    bar = tqdm(total=len(batches) * rounds, desc="adactl profile --check", unit="round", disable=not progress)
    for b in sorted(batches):  # new rows at each size, as a bench's batch: prompts it would clip to 256 tokens
        for v in engine.requests():  # (rows kept from the sizes before aged to 500-700 tokens, and a step's
            engine.cancel(v.request_id)  # attention spans the widest row: docs/issue30/width)
        engine.pop_finished()
        while len(engine.requests()) < b:
            engine.add_request([rng.randrange(1, vocab) for _ in range(rng.randint(16, longest))], sampling)
        while any(v.status != "running" for v in engine.requests()):
            engine.step(StepPlan(draft_len=0, prefill_budget=512))
        for k in (1, 1, 0, *ks):  # warm-up: each length once (with CUDA graphs: their captures)
            engine.step(StepPlan(draft_len=k, prefill_budget=0))
        seen: dict[int, list[tuple[StepShape, float]]] = {k: [] for k in (0, *ks)}
        for _ in range(rounds):
            for k in rng.sample(list(seen), len(seen)):
                drafts = engine.draft_step(StepPlan(draft_len=k, prefill_budget=0))
                outcome = engine.verify()
                _sync(pair.device)
                context, span = context_of(drafts.context_len)
                shape = StepShape.of_lengths(drafts.draft_len, drafts.draft_len, 0, context, span=span,
                                             moved=outcome.moved_tokens, catchup=outcome.catchup_tokens)  # fmt: skip
                seen[k].append((shape, float(outcome.total_s)))
            bar.update(1)
        plain = np.array([t for _, t in seen[0]])
        for name, model in named.items():
            predicted_plain = float(np.mean(model.predict([s for s, _ in seen[0]])))
            for k in ks:
                logs = np.log(np.array([t for _, t in seen[k]]) / plain)  # round by round
                measured = float(np.exp(np.median(logs)))
                predicted = float(np.mean(model.predict([s for s, _ in seen[k]]))) / predicted_plain
                records.append({"profile": name, "batch_size": b, "k": k, "plain_ms": 1000 * float(np.median(plain)),
                                "measured_ratio": measured,
                                "stderr": 1.2533 * float(np.std(logs, ddof=1)) / len(logs)**0.5,
                                "predicted_ratio": predicted, "error": predicted / measured - 1})  # fmt: skip
    bar.close()
    return sorted(records, key=lambda r: list(named).index(r["profile"]))  # one profile's records together


def exact_within(records: list[dict[str, Any]], tolerance: float = 0.05) -> float:
    """How many of `records`' ratios a profile exact on this machine would put within
    `tolerance`, on this check's own noise: the sum over ratios of the chance that a measured
    ratio, off the truth by its standard error (in log), is so close. A check's ratios are
    medians of a dozen rounds, which on a noisy machine cannot resolve 5%: `make bench` run 56's
    two checks on the 2-core AMD EPYC of 2026-12-07 (median standard errors 4.9% and 4.2%) put
    its profile within 5% at 14 and 14 of 21 ratios, where an exact one would have scored 13.2
    and 15.9. Heavy-tailed rounds inflate the standard error, so this errs low: runs 53-55's
    six checks on the Intel Xeon, 18-21 against 17.1-20.5."""
    from scipy.special import ndtr

    # error = predicted / measured - 1 with predicted the truth and measured the truth x exp(e)
    high, low = -math.log1p(-tolerance), math.log1p(tolerance)  # |error| <= tolerance: e in [-low, high]
    se = np.array([max(float(r["stderr"]), 1e-12) for r in records])
    return float(np.sum(ndtr(high / se) - ndtr(-low / se)))


def summarise_check(records: list[dict[str, Any]]) -> str:
    """Per profile checked, two lines: the largest and mean error, how many are within 5% and
    how many an exact profile would be on this check's noise (`exact_within`), and how many
    exceed twice the check's own standard error."""
    lines = []
    for name in dict.fromkeys(r.get("profile", "profile") for r in records):
        mine = [r for r in records if r.get("profile", "profile") == name]
        worst = max(mine, key=lambda r: abs(r["error"]))
        beyond = [r for r in mine if abs(math.log1p(r["error"])) > 2 * r["stderr"]]
        lines.append(
            f"{name}: largest error of the predicted T(k) / T(0): {100 * worst['error']:+.1f}% "
            f"(batch {worst['batch_size']}, k = {worst['k']}); mean absolute "
            f"{100 * np.mean([abs(r['error']) for r in mine]):.1f}%; within 5%: "
            f"{sum(abs(r['error']) <= 0.05 for r in mine)} of {len(mine)} (an exact profile, on this check's noise: "
            f"{exact_within(mine):.1f})\n"
            f"the check's own standard error: median {100 * np.median([r['stderr'] for r in mine]):.1f}%; "
            f"errors beyond twice it: {len(beyond)} of {len(mine)}"
            + "".join(f"\n  batch {r['batch_size']}, k = {r['k']}: {100 * r['error']:+.1f}% "
                      f"(± {100 * r['stderr']:.1f}%)" for r in beyond))  # fmt: skip
    return "\n".join(lines)


def run_check(pair: Any, args: ProfilerSettings) -> list[dict[str, Any]]:
    """`adactl profile --check`: the table, and JSON under bench_results/."""
    from adactl.bench.common import format_table, write_json
    from adactl.runtime.device import describe

    names = [name.strip() for name in (args.profile or "this").split(",") if name.strip()] or ["this"]
    models = {name: step_cost_for(pair, None if name == "this" else name, refine=False,
                                  max_batch=max(args.check_batches)) for name in names}  # fmt: skip
    records = check_ratios(pair, models, args.check_batches, args.check_ks, args.check_rounds, args.seed + 1)
    print(format_table(records, ["profile", "batch_size", "k", "plain_ms", "measured_ratio", "stderr",
                                 "predicted_ratio", "error"]))  # fmt: skip
    print(summarise_check(records))
    out = Path(args.out or "bench_results/profile_check.json")
    write_json(out, records, {"machine": describe(pair.device, pair.dtype).to_dict(), "profile": args.profile or
                              "this machine's (cached)", "args": dataclasses.asdict(args)})  # fmt: skip
    return records


def shape_pair(shape: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A Llama of a named shape (`adactl.bench.step.SHAPES`) with random weights and a random
    feature draft over the first `DRAFT_VOCAB` token ids, as `adactl bench step` times them."""
    from adactl.bench.step import SHAPES, random_draft, random_model
    from adactl.runtime.models import LoadedModel, ModelPair

    if shape not in SHAPES:
        raise SystemExit(f"adactl profile: unknown --shape {shape!r}: choose from {', '.join(SHAPES)}")
    target = random_model(shape, torch.device(device), dtype)
    draft = random_draft(target, seed=1).to(device, dtype).eval()
    specs = {"target": f"shape:{shape}", "draft": "random-feature", "companion": "none"}
    return ModelPair(LoadedModel(target, None, f"shape:{shape}"), draft, None, torch.device(device), dtype, specs)


def tiny_pair(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """The smoke runs' pair: a tiny random Llama with a feature draft (no download)."""
    from adactl.runtime import FeatureDraft
    from adactl.runtime.models import LoadedModel, ModelPair, tiny_llama

    target = tiny_llama(vocab_size=256).to(device, dtype)
    draft = FeatureDraft.from_target(target, list(range(192)), 64, seed=1).to(device, dtype).eval()
    specs = {"target": "tiny", "draft": "tiny-feature", "companion": "none"}
    return ModelPair(LoadedModel(target, None, "tiny"), draft, None, torch.device(device), dtype, specs)
