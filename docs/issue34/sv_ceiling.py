"""SV's ceiling in the replay of the computed H100: six drafted tokens verified with the
verdicts known (`fixed-k6` + the verify oracle), beside SV (`fixed-k6,sv`), over `fixed-k6`,
at 64 / 128 / 256 rows, a loaded server (`--saturated 4`), greedy ShareGPT traces.

    python docs/issue34/sv_ceiling.py
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from adactl import settings
from adactl.bench import spec
from adactl.bench.spec_replay import load_replay
from adactl.controllers import FixedDraftLength, oracle
from adactl.loop import ControlLoop
from adactl.stacks import build_stack

for batch in (64, 128, 256):
    parser = argparse.ArgumentParser()
    spec.add_arguments(parser)
    ns = parser.parse_args(["--replay", "--profile", "h100-llama-3.1-8b", "--batches", str(batch), "--saturated", "4",
                            "--temperatures", "0"])  # fmt: skip
    args = settings.from_args(spec.SpecSettings, ns).resolved()
    engines, prompts, ctx, _, _, _ = load_replay(args)
    rate = {}
    for name in ("fixed-k6", "fixed-k6,sv", "fixed-k6+verdicts"):
        companion = name.endswith(",sv")
        engine = engines(companion, batch)
        if name == "fixed-k6+verdicts":
            loop = ControlLoop(engine, schedule=[FixedDraftLength(6)], verify=oracle(engine, ctx.costs(False)),
                               max_draft_len=8, clock=engine.clock)  # fmt: skip
        else:
            here = ctx.stack_context(companion, 0.0)
            built = build_stack(name, here)
            loop = ControlLoop(engine, schedule=built.schedule, verify=built.verify, max_draft_len=8,
                               clock=engine.clock, estimators=[here.cost()])  # fmt: skip
        run = spec.Serving(engine, loop, prompts[: 4 * batch], 0.0, args, tqdm(disable=True), controller=name)
        rate[name] = spec._served(run)["tokens_per_s"]  # after the first step (the prefill), since 2026-12-03
    print(f"batch {batch}: SV / fixed-k6 {rate['fixed-k6,sv'] / rate['fixed-k6']:.3f}, "
          f"verdicts known / fixed-k6 {rate['fixed-k6+verdicts'] / rate['fixed-k6']:.3f}")  # fmt: skip
