"""Replay experiment (issue 30): `GoodputLength` with another default margin (`margin0.05`; 0.06 is
now the default), or with a hysteresis on its chosen length (`hyst0.05`, not landed), then the CLI:

    python docs/issue30/margin_replay/variant.py margin0.03 bench spec --replay ...
"""
import sys
from dataclasses import replace

import adactl.controllers.goodput as g

variant = sys.argv[1]
orig_act = g.GoodputLength.act
if variant.startswith("margin"):
    m = float(variant[6:])
    names = g.GoodputLength.__init__.__code__.co_varnames[1 : g.GoodputLength.__init__.__code__.co_argcount]
    defaults = dict(zip(names[-len(g.GoodputLength.__init__.__defaults__) :], g.GoodputLength.__init__.__defaults__))
    defaults["margin"] = m
    g.GoodputLength.__init__.__defaults__ = tuple(defaults.values())
elif variant.startswith("hyst"):
    h = float(variant[4:])
    def act(self, state, utilities):
        plan = orig_act(self, state, utilities)
        prev = getattr(self, "_prev", None)
        running = [r for r in state.running if state.plan.run is None or r.request_id in state.plan.run]
        if prev is not None and plan.draft_len != prev and prev <= state.max_draft_len and running:
            import torch
            alpha = utilities.alpha.mean(0) if utilities.alpha.numel() else torch.zeros(state.max_draft_len)
            rates = g.goodput_rates(self.step_time, alpha, len(running), sum(r.context_len for r in running))
            if rates[plan.draft_len] < rates[prev] * (1 + h):
                plan = replace(plan, draft_len=prev)
        self._prev = plan.draft_len
        return plan
    g.GoodputLength.act = act
from adactl.cli import main
sys.exit(main(sys.argv[2:]))
