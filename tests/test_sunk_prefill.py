"""A step that also prefills pays for the prefill whatever it drafts: the length controllers
compare what drafting adds with what it costs on top of it (`goodput.SunkPrefill`), not the
step's own tokens per second, which counts the prefill against plain decoding and drafts
where plain decoding is faster (the H100 replay at 128-256 rows, issue 34)."""

from __future__ import annotations

import numpy as np
import torch

from adactl.controllers import GoodputLength, GoodputTree, RequestGoodput
from adactl.controllers.goodput import SunkPrefill, chain_step, goodput_rates
from adactl.estimators import MovingAverage, StepShape
from adactl.estimators.gpu_cost import shipped_gpu_profile
from adactl.interface import AcceptanceEstimate, ScheduleState
from adactl.runtime import RequestView, SamplingParams


class PrefillCost:
    """A decode step costs 20 ms, `draft_extra` more if it drafts; a prefill adds 30 ms, and
    `knee` more again where it drafts beside it (past a compute knee, the verify tokens cost
    more on top of a prefill than alone)."""

    def __init__(self, draft_extra: float, knee: float = 0.0) -> None:
        self.draft_extra, self.knee = draft_extra, knee

    def predict(self, shapes: list[StepShape]) -> np.ndarray:
        d = np.array([s.max_draft > 0 for s in shapes], dtype=float)
        p = np.array([s.prefill_tokens > 0 for s in shapes], dtype=float)
        return 0.02 * (1 + self.draft_extra * d) + (0.03 + self.knee * d) * p


def _state(prompt: int) -> ScheduleState:
    sampling = SamplingParams(max_new_tokens=200)
    running = tuple(RequestView(f"r{i}", "running", 16, 16, 1, 17, 0.0, 0.1, sampling) for i in range(16))
    waiting = RequestView("w", "waiting", prompt, 0, 0, prompt, 0.0, None, sampling)
    return ScheduleState(1.0, (waiting, *running) if prompt else running, max_draft_len=1)


def test_length_controllers_draft_on_a_prefill_step_only_where_drafting_pays_on_its_own():
    """At alpha 0.5 a one-token draft yields 1.5 tokens a row. Drafting that costs 60% more
    loses alone (1.5 / 1.6), and still loses beside a 30 ms prefill, though that step's own
    rate says 1.21x; at 35% it wins either way (1.11x); at 35% plus 10 ms more beside the
    prefill (a knee) it loses there (1.5 x 20 / 37 = 0.81x of plain), while it wins alone."""
    for extra, knee, alone, beside in ((0.6, 0.0, 0, 0), (0.35, 0.0, 1, 1), (0.35, 0.01, 1, 0)):
        cost = PrefillCost(extra, knee)
        ma = MovingAverage(prior=0.5)
        for ctl in (GoodputLength(cost, ma, explore=0.0), GoodputTree(cost, ma, width=1)):
            for prompt, drafts in ((0, alone), (300, beside)):
                state = _state(prompt)
                plan = ctl.act(state, ma.estimate(state)) if isinstance(ctl, GoodputLength) else ctl.act(state)
                assert plan.draft_len == drafts, (type(ctl).__name__, extra, knee, prompt)
        req = RequestGoodput(cost, explore=0.0)
        estimate = AcceptanceEstimate(torch.full((16, 1), 0.5))  # one row a running request
        for prompt, drafts in ((0, alone), (300, beside)):
            plan = req.act(_state(prompt), estimate)
            assert sum(plan.draft_len.values()) == 16 * drafts, ("goodput-req", extra, knee, prompt)


def test_the_computed_h100_drafts_beside_a_prefill_only_where_it_pays():
    """The computed H100 x Llama-3.1-8B physics at 128 rows of 600 tokens and a 300-token
    prefill, acceptance 0.48 / 0.3 / 0.2 / 0.15: the step's own rate puts k = 1 11% above
    plain decoding; what k = 1 adds for what it costs on top of the prefill is 1% short of
    plain decoding's own rate. The marginal rule keeps plain decoding; alone, at 128 rows,
    it drafts as before; and the prefill's cost on plain decoding is all that is taken off."""
    h100 = shipped_gpu_profile("h100-llama-3.1-8b")
    alpha = torch.tensor([0.48, 0.3, 0.2, 0.15])
    rows, context = 128, 128 * 600
    whole = [h100.predict([chain_step(rows, c, context, 300)])[0] for c in range(2)]
    tokens = rows * np.array([1.0, 1.48])
    assert tokens[1] / whole[1] > 1.1 * tokens[0] / whole[0]  # the step's own rate: draft
    rates = goodput_rates(h100, alpha, rows, context, prefill=300)
    assert rates[1] < rates[0]  # marginal: plain decoding
    assert goodput_rates(h100, alpha, rows, context)[1] > goodput_rates(h100, alpha, rows, context)[0]
    sunk = SunkPrefill(h100).predict([chain_step(rows, 0, context, 300), chain_step(rows, 1, context)])
    assert np.allclose(sunk, h100.predict([chain_step(rows, 0, context), chain_step(rows, 1, context)]))
