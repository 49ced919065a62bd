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
from adactl.runtime import Engine, EngineConfig, SamplingParams, StepPlan
from adactl.runtime.traces import SIGNALS, AcceptanceTraces, RequestTrace


def record_traces(pair: Any, prompts: Sequence[Sequence[int]], temperature: float, k: int = 8,
                  max_new_tokens: int = 96, batch: int = 16, seed: int = 0, workload: str = "",
                  progress: bool = True) -> AcceptanceTraces:  # fmt: skip
    """Traces of `prompts` served by `pair` (a `ModelPair`, with its companion if it has one)."""
    if k < 1 or max_new_tokens < 1 or batch < 1 or not prompts:
        raise ValueError(f"k, max_new_tokens and batch must be >= 1 and prompts non-empty, got {k}, "
                         f"{max_new_tokens}, {batch}, {len(prompts)} prompts")  # fmt: skip
    speculator = pair.speculator(with_companion=pair.companion is not None)
    engine = Engine(pair.target.model, speculator, config=EngineConfig(max_batch_size=batch, seed=seed))
    peek = PerfectAcceptance(engine)
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
        reasons: dict[str, str] = {}
        while engine.has_unfinished():
            drafts = engine.draft_step(StepPlan(draft_len=k, prefill_budget=sum(map(len, chunk))))
            if drafts.request_ids:
                alpha = peek.estimate(VerifyState(0.0, drafts)).alpha.numpy()  # [B, K]
                s = drafts.summarized()
                parts = [s.token_prob, s.entropy, s.margin, s.companion_token_prob, s.overlap]
                sig = np.stack([np.zeros(alpha.shape) if t is None else t.numpy() for t in parts], -1)  # [B, K, S]
                for i, rid in enumerate(drafts.request_ids):
                    if int(drafts.draft_len[i]) == k:  # positions near the end draft fewer: not kept
                        ratio[rid].append(alpha[i, :k])
                        signals[rid].append(sig[i, :k])
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
            traces.append(RequestTrace(len(p), s.temperature <= 0, r.astype(np.float32), g.astype(np.float32),
                                       workload, eos=eos and len(r) == keep))  # fmt: skip
    bar.close()
    meta = {"models": dict(pair.model_ids), "workload": workload, "temperature": temperature, "k": k,
            "max_new_tokens": max_new_tokens, "seed": seed, "signals": list(SIGNALS)}  # fmt: skip
    return AcceptanceTraces(traces, meta)
