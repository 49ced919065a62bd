"""The most requests/s any scheduler can serve from a KV pool: `--workload mixed-consumers`.

Issue 33 asks ProgressServe for 2.0x `vllm-v1`'s capacity at SLO on `mixed-consumers` with a
20k-token pool (the README's sustained run: 37.5 against 35 requests/s). Every output token
j of request i is made in a step during which the request's context, p_i + j tokens in
16-token blocks, is on the device, and a step with KV of C tokens resident costs at least
T(C): the launch, one read of the weights and a read of those C tokens (the computed
profile's decode step; more rows only add to it). So over a run of length W,

    sum over steps of (KV resident x step time) <= pool x W,   and each token's share >= ctx_ij x T_min,

and at a sustained rate lambda, lambda x E_i[sum_j ctx_ij] x T_min <= pool: the memory-time
bound, with T_min the cheapest step that holds a full pool (a lower bound on the seconds a
token's context occupies its blocks for). It leaves out prefill (its blocks and its time),
the host copies of offload and the readers' deadlines, so a real scheduler stays below it.

    PYTHONPATH=. python docs/issue33/mixed_bound/bound.py --kv-tokens 20000 --requests 1500
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from adactl.bench.stream import StreamSettings, _workload
from adactl.estimators.gpu_cost import shipped_gpu_profile
from adactl.runtime.shapes import StepShape


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="h100-llama-3.1-8b")
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--kv-tokens", type=int, default=20000)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--block", type=int, default=16)
    args = ap.parse_args()
    settings = StreamSettings(
        workload="mixed-consumers", requests=args.requests, max_new_tokens=args.max_new_tokens, replay=True
    )
    _, reqs, _ = _workload(settings)
    b = args.block
    # the KV tokens (whole blocks) a request holds over its steps, summed
    held = [sum(math.ceil((len(p) + j) / b) * b for j in range(1, n + 1)) for p, n in reqs]
    prompts, replies = np.array([len(p) for p, _ in reqs]), np.array([n for _, n in reqs])
    cost = shipped_gpu_profile(args.profile)

    def step_s(rows: int, context: int) -> float:
        return float(cost.predict([StepShape(rows=rows, verify_tokens=rows, max_verify=1, draft_tokens=0, max_draft=0,
                                             prefill_tokens=0, context_tokens=context)])[0])  # fmt: skip

    mean_ctx = float(np.mean(held) / np.mean(replies))  # a token's context, averaged over tokens
    rows = max(1, int(args.kv_tokens / mean_ctx))
    cheapest = step_s(1, args.kv_tokens)  # one row reading a whole pool: less than any full-pool step
    typical = step_s(rows, args.kv_tokens)  # the full pool as rows of the mean context
    print(
        f"{len(reqs)} requests: prompt mean {prompts.mean():.0f} tokens, reply mean {replies.mean():.0f}; "
        f"a token's context {mean_ctx:.0f} tokens on average, so a {args.kv_tokens}-token pool holds "
        f"about {rows} rows"
    )
    for name, t in (("cheapest full-pool step (1 row)", cheapest), (f"full pool as {rows} rows", typical)):
        rate = args.kv_tokens / (float(np.mean(held)) * t)
        print(
            f"{name}: {1000 * t:.2f} ms a step -> at most {rate:.1f} requests/s ({rate * replies.mean():.0f} tokens/s)"
        )


if __name__ == "__main__":
    main()
