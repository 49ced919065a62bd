"""Andes-style priority: serve the requests whose delivery lags their reader's timeline most.

    lag_i = (units the reader expected by now: rate_i * (now - first-unit deadline_i) + 1)
            - (units generated)
    run   = the max_running running requests with the largest lag
    admit = waiting requests in arrival order while in-flight <= max_num_seqs

(Andes schedules by the QoE a request would gain; with a reader that consumes at a steady
rate, the gain is largest where delivery is furthest behind the expected timeline.)
"""

from __future__ import annotations

from adactl.runtime.types import RequestView

from .stream_common import PriorityScheduler, lag


class AndesPriority(PriorityScheduler):
    label = "andes"

    def run_key(self, view: RequestView, now: float) -> float:
        return -lag(view, now)
