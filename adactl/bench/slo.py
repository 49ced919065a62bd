"""`adactl bench spec --slo`: speculation controllers under mixed TPOT SLOs and Poisson arrivals.

Requests arrive open-loop (Poisson, `--rate` per second, seeded) with a TPOT SLO drawn in
turn from three classes (`--slo-tpot`: tight, medium, loose) and are served as they come.
A request attains its SLO when its time per output token after the first,
(finish - first token) / (tokens - 1), is within its class's bound. Reported per controller:
SLO attainment (overall and per class), SLO goodput (tokens of requests on their SLO per
second), tokens/s, and `ratio_attainment_fixed` (to the best fixed draft length). With
`--trees`, AdaServe over token trees (`slo-tree,adaserve-conf`) runs too, next to the same
chain version on the same acceptance estimator (`slo,adaserve-conf`). With `--replay`, the
same on the profile replay, in its regime's units (defaults: TPOT classes of 6 / 9 / 15 ms,
30 requests a second, 400 requests, 128 tokens each).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from adactl import metrics
from adactl.loop import ControlLoop
from adactl.runtime import SLO, SamplingParams
from adactl.stacks import build_stack, is_fixed, needs_companion
from adactl.workloads import Arrival, OpenLoop, arrival_times

if TYPE_CHECKING:
    from adactl.bench.spec import SpecSettings

CLASSES = ("tight", "medium", "loose")


def serve_open_loop(loop: ControlLoop, prompts: list[list[int]], times: list[float],
                    tpots: list[float], args: SpecSettings, bar: tqdm) -> dict[str, Any]:  # fmt: skip
    """Add each request at its arrival time (wall clock from the start); step until all finish."""
    arrivals = [Arrival(times[i], p, SamplingParams(args.max_new_tokens, seed=args.seed + i), slo=SLO(tpot_s=tpots[i]))
                for i, p in enumerate(prompts)]  # fmt: skip
    driver = OpenLoop(loop, arrivals)
    wall = driver.run(lambda record: bar.update(record.outcome.tokens_emitted))
    ids = driver.index
    per_class: dict[str, list[bool]] = {c: [] for c in CLASSES}
    good_tokens = tokens = 0
    for rid, result in loop.results.items():
        i = ids[rid]
        n = len(result.output_ids)
        ok = metrics.on_tpot_slo(result, tpots[i])
        per_class[CLASSES[i % len(CLASSES)]].append(ok)
        tokens, good_tokens = tokens + n, good_tokens + (n if ok else 0)
    met = [ok for v in per_class.values() for ok in v]
    return {
        metrics.ATTAINMENT: sum(met) / max(len(met), 1),
        **{f"{metrics.ATTAINMENT}_{c}": sum(v) / max(len(v), 1) for c, v in per_class.items()},
        metrics.SLO_GOODPUT: good_tokens / wall,
        metrics.TOKENS_PER_S: tokens / wall,
        "requests": len(met),
        "fallbacks": dict(loop.fallbacks),
    }


def run(args: SpecSettings, engines: Callable[[bool, int], Any], prompts: list[list[int]], ctx: Any
        ) -> list[dict[str, Any]]:  # fmt: skip
    """`engines(companion, max_batch)`: a fresh engine per run (the real one, or the replay's);
    `ctx`: the spec bench's `RunContext`. The stacks: `--slo-controllers`, then AdaServe
    (`slo,adaserve`: per-request draft lengths SLO first, then SLO-first verify lengths)."""
    n = args.slo_requests
    times = arrival_times(n, args.rate, args.seed)
    tpots = [args.slo_tpot[i % len(CLASSES)] for i in range(n)]
    chosen = [*(args.slo_controllers or []), "slo,adaserve"]
    if getattr(args, "trees", False):
        # over token trees (`tree_width` alternatives per level); trees carry no companion
        # signal, so they read the calibrated draft confidence, and so does the chain run
        # beside them (`slo,adaserve-conf`) that isolates what the trees add
        chosen += ["slo,adaserve-conf", "slo-tree,adaserve-conf"]
    records = []
    bar = tqdm(total=n * args.max_new_tokens * len(chosen), desc="bench spec --slo", unit="tok")
    for stack in chosen:
        companion = needs_companion(stack)
        engine = engines(companion, args.max_batch)
        here = replace(ctx.stack_context(companion), seed=args.seed)  # (the controllers' own draws)
        built = build_stack(stack, here)
        loop = ControlLoop(engine, schedule=built.schedule, verify=built.verify, max_draft_len=8,
                           estimators=[here.cost()], clock=getattr(engine, "clock", time.perf_counter))  # fmt: skip
        records.append({"controller": stack, "rate": args.rate,
                        **serve_open_loop(loop, prompts[:n], times, tpots, args, bar)})  # fmt: skip
    bar.close()
    fixed = [r["attainment"] for r in records if is_fixed(r["controller"])]
    best = max(fixed) if fixed else float("nan")
    for r in records:
        r["ratio_attainment_fixed"] = r["attainment"] / best if best > 0 else float("inf")
    return records
