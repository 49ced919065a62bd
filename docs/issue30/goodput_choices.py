"""What `goodput` chooses at one batch size and temperature, step by step: `bench spec` with
no-spec, fixed k = 1 and goodput (`--rounds` rounds), each goodput step logged with its rows,
the batch's mean acceptance at positions 1-3, goodput predicted for c = 0..3 over c = 1's, and
the step cost predicted for c = 0..3 over plain decoding's; then the count of each length.

    PYTHONPATH=. python docs/issue30/goodput_choices.py [--batch 4] [--temperature 0.7] [--rounds 3]
"""

import argparse
from collections import Counter

import numpy as np

from adactl.bench import spec
from adactl.controllers import goodput


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    log = []
    act = goodput.GoodputLength.act

    def logged(self, state, utilities):
        plan = act(self, state, utilities)
        running = [r for r in state.running if state.plan.run is None or r.request_id in state.plan.run]
        if running and utilities.alpha.numel():
            alpha = utilities.alpha.mean(0)
            context = sum(r.context_len for r in running)
            prefill = min(state.plan.prefill_budget, sum(r.prompt_len - r.prefilled for r in state.waiting))
            rates = goodput.goodput_rates(self.step_time, alpha, len(running), context, prefill)
            cost = self.step_time.predict([goodput.chain_step(len(running), c, context, prefill) for c in range(4)])
            log.append((plan.draft_len, len(running), np.round(alpha.numpy()[:3], 3),
                        np.round(rates[:4] / rates[1], 3), np.round(cost / cost[0], 3)))  # fmt: skip
        return plan

    goodput.GoodputLength.act = logged
    args = spec.SpecSettings(batches=[a.batch], temperatures=[a.temperature], ks=[1], rounds=a.rounds,
                             controllers=["no-spec", "fixed-k1", "goodput"], out="bench_results/goodput_choices")
    spec.run(args.resolved())
    print("drafted, rows, alpha[:3], goodput(c) / goodput(1), cost(c) / cost(0)")
    for entry in log:
        print(*entry)
    print("steps by length drafted:", dict(Counter(e[0] for e in log)))


if __name__ == "__main__":
    main()
