"""A draft that rarely or never agrees with the target: per-request goodput against plain
decoding and the batch-mean goodput length, in the replay of the computed H100 (4 x batch
requests of 96 tokens, every request accepting each position with the same probability),
with the kind's acceptance prior at 20 units of information (before 2026-12-04) and at 2 (now).

    PYTHONPATH=. python docs/issue34/useless_draft.py

Each cell: tokens per simulated second ÷ the best of the row.
"""

from __future__ import annotations

from adactl.bench.spec_replay import truth
from adactl.controllers import FixedDraftLength, GoodputLength, RequestGoodput
from adactl.estimators import MovingAverage, RequestAcceptance
from adactl.estimators.step_cost import StepCostProfile
from adactl.profiler import named_profile
from adactl.runtime.replay import ReplayEngine
from adactl.runtime.traces import AcceptanceTraces
from tests.test_request_goodput import serve, trace


def main() -> None:
    h100 = truth(StepCostProfile.load(named_profile("h100-llama-3.1-8b")))
    stacks = {
        "no-spec": lambda: [FixedDraftLength(0)],
        "goodput": lambda: [GoodputLength(h100, MovingAverage())],
        "goodput-req (h0 20)": lambda: [RequestGoodput(h100, RequestAcceptance(MovingAverage(), h0=20.0))],
        "goodput-req (h0 2)": lambda: [RequestGoodput(h100, RequestAcceptance(MovingAverage(), h0=2.0))],
    }
    print("| acceptance | batch | " + " | ".join(stacks) + " |")
    print("|---" * (len(stacks) + 2) + "|")
    for accept in (0.0, 0.1, 0.3):
        for batch in (1, 8, 32):
            rates = {}
            for name, make in stacks.items():
                engine = ReplayEngine(h100, traces=AcceptanceTraces([trace(accept)]), max_batch_size=batch)
                rates[name] = serve(engine, make(), n=batch, total=4 * batch)[0]
            best = max(rates.values())
            print(f"| {accept} | {batch} | " + " | ".join(f"{r / best:.3f}" for r in rates.values()) + " |")


if __name__ == "__main__":
    main()
