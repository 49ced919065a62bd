"""The oracle (benchmarks only): verification that knows the target's verdict in advance.

`PerfectAcceptance` asks the engine for the target's distributions over the pending drafts
(`Engine.peek_target`, off the clock: its seconds are kept in `.seconds` for the benchmark to
subtract) and gives the exact conditional acceptance:

    alpha_ij = 1[argmax p_ij = d_ij]            greedy rows (argmax agreement)
    alpha_ij = min(1, p_ij(d_ij) / q_ij(d_ij))  sampled rows (the rejection rule's probability)

On the replay (`ReplayEngine.verdict`, `.verdict_path` for trees) the outcome is known
outright: alpha 1 on the tokens each row's whole draft would keep, 0 elsewhere.
Two bounds for per-request draft lengths (the replay only; per-request goodput, then the
verify oracle), beside the batch's:
- `request_oracle`: each request's acceptance known in hindsight (`Hindsight`: its trace's
  conditional acceptance by position, averaged over the request): what a perfect per-request
  estimate could gain;
- `lookahead_oracle`: each step's verdict known before drafting (`Lookahead`: alpha 1 on the
  tokens a k-token draft would keep, 0 after), so each row drafts exactly what the target will
  accept where that pays: what any draft-length policy could gain.
`oracle(engine, step_time)` is Speculative Verification with it: for greedy rows it verifies
exactly the tokens the target accepts (when that pays), for sampled rows the best length in
expectation. Every controller is compared with it as the upper bound. On a token tree, node j's alpha
comes from the target's distribution at its parent, so for greedy rows the survival is 1
exactly on the path the target accepts and the oracle verifies just that path (sampled rows:
the chain rule's probability per node, which leaves out the sibling residuals).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from adactl.estimators.features import drafted_mask
from adactl.estimators.step_time import StepTimePredictor
from adactl.interface import AcceptanceEstimate, ScheduleState, StepRecord, VerifyState

from .request_goodput import RequestGoodput
from .sv import SpeculativeVerification


class PerfectAcceptance:
    name = "perfect"

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.seconds = 0.0  # spent peeking: not a cost a real controller could have

    def estimate(self, state: VerifyState) -> AcceptanceEstimate:
        d = state.drafts
        verdict = getattr(self.engine, "verdict", None)
        if verdict is not None:  # the replay knows its outcome: the nodes each whole draft would keep
            if d.parents is not None:
                return AcceptanceEstimate(self.engine.verdict_path().float() * drafted_mask(d), d.parents)
            kept = verdict()
            alpha = (torch.arange(d.tokens.shape[1])[None, :] < kept[:, None]).float() * drafted_mask(d)
            return AcceptanceEstimate(alpha, d.parents)
        # off the clock: the peek's kernels are timed between two syncs, so on a GPU its cost
        # is not left to be counted in the verify forward that follows
        self.engine.synchronize()
        t0 = time.perf_counter()
        p = self.engine.peek_target()  # [B, K + 1, V] on the engine's device
        if d.parents is None:
            p = p[:, :-1]  # position j: where draft token j goes
        else:  # node j goes where its parent's distribution is: slot parent + 1 (0: the last token)
            slot = (d.parents + 1).clamp(min=0).to(p.device)
            p = p.gather(1, slot[..., None].expand(-1, -1, p.shape[-1]))
        tokens = d.tokens.to(p.device)
        tok = tokens.clamp(min=0)[..., None]
        p_tok, q_tok = p.gather(-1, tok)[..., 0], d.probs.to(p.device).gather(-1, tok)[..., 0]
        agree = (p.argmax(-1) == tokens).float()
        rule = torch.clamp(p_tok / q_tok.clamp(min=1e-12), max=1.0)
        alpha = torch.where(d.greedy[:, None], agree.cpu(), rule.cpu()) * drafted_mask(d)
        self.seconds += time.perf_counter() - t0  # (.cpu() waited for the kernels)
        return AcceptanceEstimate(alpha, d.parents)

    def update(self, record: StepRecord) -> None:
        return None


def oracle(engine: Any, step_time: StepTimePredictor) -> SpeculativeVerification:
    controller = SpeculativeVerification(PerfectAcceptance(engine), step_time)
    controller.name = "oracle"
    return controller


class Lookahead:
    """Before drafting, each running request's verdict on a whole draft (the replay's hindsight)."""

    name = "lookahead"

    def __init__(self, engine: Any) -> None:
        if not hasattr(engine, "lookahead"):
            raise ValueError("the lookahead oracle needs an engine that knows verdicts before drafting (the replay)")
        self.engine = engine

    def estimate(self, state: ScheduleState) -> AcceptanceEstimate:
        k = state.max_draft_len
        kept = self.engine.lookahead([r.request_id for r in state.running], k)  # [R]
        return AcceptanceEstimate((torch.arange(k)[None, :] < kept[:, None]).float())

    def update(self, record: StepRecord) -> None:
        return None


class Hindsight(Lookahead):
    """Before drafting, each running request's acceptance by position over its whole output."""

    name = "hindsight"

    def estimate(self, state: ScheduleState) -> AcceptanceEstimate:
        return AcceptanceEstimate(self.engine.hindsight([r.request_id for r in state.running], state.max_draft_len))


def request_oracle(engine: Any, step_time: StepTimePredictor,
                   lookahead: bool = False) -> tuple[RequestGoodput, SpeculativeVerification]:  # fmt: skip
    """A per-request bound: per-request goodput knowing each request's acceptance in hindsight
    (`lookahead`: each step's verdict), then the verify oracle."""
    known = Lookahead(engine) if lookahead else Hindsight(engine)
    schedule = RequestGoodput(step_time, known, explore=0.0)
    schedule.name = "lookahead-oracle" if lookahead else "request-oracle"
    return schedule, oracle(engine, step_time)
