"""Recording per-request acceptance traces from the real engine (adactl.runtime.traces).

`record_traces` serves the prompts on the engine with the draft (and its companion) and, at
every decode step, drafts K tokens for every row, reads the target's verdict on them off the
clock (the oracle's peek, `PerfectAcceptance`: the argmax agreement of greedy rows, the
rejection rule's min(1, p / q) of sampled ones) with the draft's signals (`DraftSummary`),
and then verifies none of them, so each step emits exactly the target's own next token and
every output position is recorded once. The output is what the target alone would generate
(greedy: its argmax; sampled: a sample of its distribution), so the traces hold what any
controller's drafts would meet along the request's real continuation.

Requests run `max_new_tokens + K` tokens so that every kept position drafted all K (the last
K are cut off); a request that ends by EOS keeps the positions it reached and says so.

With `tree_width` W, each step drafts instead a depth-K, width-W tree keeping every node the
growth proposes, and records per node its parent and its sibling-conditional acceptance
(`adactl.runtime.verify.sibling_ratios` on the target's distribution at its parent): a tree
trace (adactl.runtime.traces).
Not here: the file format and replaying (adactl.runtime.traces, adactl.runtime.replay).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from adactl.controllers.oracle import PerfectAcceptance
from adactl.interface import VerifyState
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan, TreeSpec
from adactl.runtime.traces import SIGNALS, AcceptanceTraces, RequestTrace
from adactl.runtime.types import DraftBatch, node_depth
from adactl.runtime.verify import sibling_ratios


def record_traces(pair: Any, prompts: Sequence[Sequence[int]], temperature: float, k: int = 8,
                  max_new_tokens: int = 96, batch: int = 16, seed: int = 0, workload: str = "",
                  progress: bool = True, tree_width: int = 0) -> AcceptanceTraces:  # fmt: skip
    """Traces of `prompts` served by `pair` (a `ModelPair`, with its companion if it has one);
    `tree_width` W >= 2: tree traces of depth k (module docstring)."""
    if k < 1 or max_new_tokens < 1 or batch < 1 or not prompts or tree_width < 0 or tree_width == 1:
        raise ValueError(f"k, max_new_tokens and batch must be >= 1, prompts non-empty and tree_width 0 or >= 2, got "
                         f"{k}, {max_new_tokens}, {batch}, {len(prompts)} prompts, {tree_width}")  # fmt: skip
    speculator = pair.speculator(with_companion=pair.companion is not None)
    engine = Engine(pair.target.model, speculator, config=EngineConfig(max_batch_size=batch, seed=seed))
    peek = PerfectAcceptance(engine)
    spec = TreeSpec(k, tree_width, tree_width + (k - 1) * tree_width**2) if tree_width else None
    width = spec.nodes if spec is not None else k  # values recorded per position
    traces: list[RequestTrace] = []
    bar = tqdm(total=len(prompts) * max_new_tokens, desc=f"traces {workload} t={temperature:g}", unit="tok",
               disable=not progress)  # fmt: skip
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        sampling = [SamplingParams(max_new_tokens + k, temperature=temperature, seed=seed + start + i)
                    for i in range(len(chunk))]  # fmt: skip
        ids = [engine.add_request(list(p), s) for p, s in zip(chunk, sampling)]
        ratio: dict[str, list[np.ndarray]] = {r: [] for r in ids}
        signals: dict[str, list[np.ndarray]] = {r: [] for r in ids}
        parents: dict[str, list[np.ndarray]] = {r: [] for r in ids}
        reasons: dict[str, str] = {}
        while engine.has_unfinished():
            drafts = engine.draft_step(StepPlan(draft_len=k, prefill_budget=sum(map(len, chunk)), tree=spec))
            if drafts.request_ids:
                if spec is None:
                    alpha = peek.estimate(VerifyState(0.0, drafts)).alpha.numpy()  # [B, K]
                    full = drafts.draft_len == k  # positions near the end draft fewer: not kept
                else:
                    alpha, full = _tree_ratios(engine, drafts, k)
                s = drafts.summarized()
                parts = [s.token_prob, s.entropy, s.margin, s.companion_token_prob, s.overlap]
                sig = np.stack([np.zeros(alpha.shape) if t is None else t.numpy() for t in parts], -1)  # [B, K, S]
                for i, rid in enumerate(drafts.request_ids):
                    if bool(full[i]):
                        n = min(alpha.shape[1], width)
                        ratio[rid].append(_padded(alpha[i, :n], width, 0.0))
                        signals[rid].append(_padded(sig[i, :n], width, 0.0))
                        if drafts.parents is not None:
                            valid = drafts.tokens[i, :n] >= 0
                            parents[rid].append(_padded(np.where(valid, drafts.parents[i, :n].numpy(), -2), width, -2))
            outcome = engine.verify(torch.zeros(len(drafts.request_ids), dtype=torch.long))
            reasons.update(outcome.finished)
            bar.update(min(outcome.tokens_emitted, bar.total - bar.n))
        generated = {r.request_id: len(r.output_ids) for r in engine.pop_finished()}
        for rid, p, s in zip(ids, chunk, sampling):
            if not ratio[rid]:
                continue  # ended by EOS before its first full draft
            # EOS within max_new_tokens: row r drafted after r + 1 tokens, so rows 0 .. generated - 2
            eos = reasons.get(rid) == "eos" and generated[rid] <= max_new_tokens
            keep = generated[rid] - 1 if eos else max_new_tokens
            r, g = np.stack(ratio[rid])[:keep], np.stack(signals[rid])[:keep]
            tree = np.stack(parents[rid])[:keep] if spec is not None else None
            traces.append(RequestTrace(len(p), s.temperature <= 0, r.astype(np.float32), g.astype(np.float32),
                                       workload, eos=eos and len(r) == keep, parents=tree, tree_width=tree_width,
                                       tree_depth=k if tree_width else 0))  # fmt: skip
    bar.close()
    meta = {"models": dict(pair.model_ids), "workload": workload, "temperature": temperature, "k": k,
            "max_new_tokens": max_new_tokens, "seed": seed, "signals": list(SIGNALS),
            **({"tree": {"depth": k, "width": tree_width}} if spec is not None else {})}  # fmt: skip
    return AcceptanceTraces(traces, meta)


def _padded(values: np.ndarray, width: int, fill: float) -> np.ndarray:
    """values [n, ...] padded with `fill` to [width, ...]."""
    out = np.full((width, *values.shape[1:]), fill, dtype=values.dtype)
    out[: len(values)] = values
    return out


def _tree_ratios(engine: Any, drafts: DraftBatch, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Each drafted node's sibling-conditional acceptance [B, N] (greedy rows: whether it is the
    target's argmax at its parent; sampled: `sibling_ratios`), and which rows grew all `depth`
    levels (near the end a request's tree is cut shallower: not kept)."""
    assert drafts.parents is not None
    p = engine.peek_target()  # [B, N + 1, V]: slot 0 after the last token, slot j + 1 after node j
    tokens, parents = drafts.tokens, drafts.parents.cpu()
    valid = tokens >= 0
    levels = torch.where(valid, node_depth(parents), -1).max(1).values if tokens.shape[1] else torch.full(
        (len(tokens),), -1)  # fmt: skip
    ratio = np.zeros(tokens.shape)
    best = p.argmax(-1).cpu()  # [B, N + 1]
    for i in range(tokens.shape[0]):
        for slot in sorted({int(x) + 1 for x in parents[i][valid[i]]}):
            kids = [j for j in range(tokens.shape[1]) if valid[i, j] and int(parents[i, j]) + 1 == slot]
            if bool(drafts.greedy[i]):
                ratio[i, kids] = [float(int(tokens[i, j]) == int(best[i, slot])) for j in kids]
            else:
                ratio[i, kids] = sibling_ratios(p[i, slot], drafts.probs[i, kids[0]], [int(tokens[i, j]) for j in kids])
    return ratio, (levels == depth - 1).numpy()
