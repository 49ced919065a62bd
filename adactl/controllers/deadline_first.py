"""Deadline first (EDF / least slack): the streaming baseline that orders by deadline.

admit = waiting requests by first-unit deadline while in-flight <= max_num_seqs
run   = the max_running running requests with the least slack, where
        slack_i = next_due_i - now + buffer_i / rate_i   (seconds until its reader runs dry)
"""

from __future__ import annotations

from adactl.runtime.types import RequestView

from .stream_common import PriorityScheduler, first_unit_deadline, slack


class DeadlineFirst(PriorityScheduler):
    label = "edf"

    def admit_key(self, view: RequestView) -> float:
        return first_unit_deadline(view)

    def run_key(self, view: RequestView, now: float) -> float:
        return slack(view, now)
