"""Record the shipped per-request acceptance traces of the default pair (issue 32, item 3).

    python train/record_traces.py                     # ShareGPT held out and HumanEval, greedy and 0.7
    python train/record_traces.py --workloads sharegpt --temperatures 0 --requests 8 --out /tmp/traces
    python train/record_traces.py --tree-width 2      # the tree traces: <workload>_<greedy|t07>_trees.npz
    python train/record_traces.py --tree-width 4      # width 4: <workload>_<greedy|t07>_trees_w4.npz

For each workload and temperature, `--requests` prompts (held-out ShareGPT, or HumanEval) are
served by SmolLM2-135M with the shipped draft and companion (adactl.traces.record_traces:
every step drafts `--k` tokens, reads the target's verdict, verifies none), and the traces
are written to `models/traces/<workload>_<greedy|t07>.npz`, which `adactl bench spec
--replay` and the envs draw requests from. A mixed chat + code workload is both files
interleaved (`AcceptanceTraces.mix`). About 6 minutes per file on the 2-core CPU.

With `--tree-width W`, each position records every node of a depth-`--k`, width-W token tree
instead (adactl.traces), written next to the chain file as `<workload>_<t>_trees.npz` (width 2;
`..._trees_wW.npz` for another width); the
replay attaches it to the chain traces of the same requests and drafts trees from it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from adactl.runtime.models import load_pair
from adactl.runtime.traces import shipped_traces_path
from adactl.traces import record_traces
from adactl.workloads import chat_prompts, humaneval_prompts, read_sharegpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="sharegpt,humaneval")
    parser.add_argument("--temperatures", default="0,0.7")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--k", type=int, default=6, help="draft tokens recorded per position")
    parser.add_argument("--tree-width", type=int, default=0,
                        help="record tree traces of this width (depth --k) next to the chain ones: "
                             "<workload>_<t>_trees.npz (0: chains)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory (default: the shipped models/traces)")
    args = parser.parse_args()
    pair = load_pair("smollm2", "draft", "companion", "cpu", "float32")
    for workload in args.workloads.split(","):
        if workload == "humaneval":
            prompts = humaneval_prompts(pair.tokenizer, args.requests, args.max_prompt_tokens)
        else:
            prompts = chat_prompts(pair.tokenizer, args.requests, args.max_prompt_tokens, read_sharegpt(),
                                   held_out=True)  # fmt: skip
        for temperature in (float(t) for t in args.temperatures.split(",")):
            t0 = time.perf_counter()
            traces = record_traces(pair, prompts, temperature, args.k, args.max_new_tokens, args.batch, args.seed,
                                   workload, tree_width=args.tree_width)  # fmt: skip
            traces.meta["record_s"] = round(time.perf_counter() - t0, 1)
            path = shipped_traces_path(workload, temperature, trees=args.tree_width > 0, tree_width=args.tree_width)
            path = Path(args.out) / path.name if args.out else path
            traces.save(path)
            if traces.tree is not None:
                nodes = np.concatenate([t.ratio[t.parents >= -1] for t in traces.requests])
                what = f"mean node acceptance {float(nodes.mean()):.3f}"
            else:
                what = f"mean conditional acceptance by position {np.round(traces.mean_acceptance(), 3).tolist()}"
            print(f"{workload} t={temperature:g}: {len(traces)} requests in {traces.meta['record_s']} s, {what} -> "
                  f"{path}")  # fmt: skip


if __name__ == "__main__":
    main()
