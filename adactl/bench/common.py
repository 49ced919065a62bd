"""What every benchmark shares: peak-memory sampling, the results table, JSON and plot output,
and the log of a run's steps that `--validate` prices with the replay's cost model (and fits
a model of its own on, to replay the run with its own step costs)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from adactl.estimators.step_cost import Fingerprint, StepCostModel, StepCostProfile
from adactl.estimators.step_time import PARTS
from adactl.runtime.shapes import StepShape


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that the next
    configuration's resident-memory baseline does not depend on what ran before it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Samples this process's resident memory in a thread; `.peak_mb` is the rise over the start."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start_rss = self.peak_rss = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self.start_rss = self.peak_rss = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return (self.peak_rss - self.start_rss) / 2**20


@contextmanager
def one_thread(on: bool = True) -> Iterator[None]:
    """Torch on one intra-op thread while inside (`on`), as it was after. For replays: their
    tensors are the controllers' (a thousand rows at most), where a second thread only waits;
    and on a busy 2-core machine it waits long (a deadline-risk estimate over 1,000 streams
    took 324 ms on two threads beside another process, 3.7 ms on one; a chat replay 65 s
    against 39 s)."""
    before = torch.get_num_threads()
    if on:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def format_table(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of `columns` (floats to 3 significant digits, missing as '-')."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join(lines)


def write_json(path: Path, records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    """{"meta": ..., "records": [...]}, a record a line. Indenting the records put each item of a
    record's per-step action log on a line of its own: one `bench spec --replay --workload mixed`
    file 1.9 MB that way, 0.7 MB this way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(r, separators=(", ", ": ")) for r in records)
    path.write_text(f'{{"meta": {json.dumps(meta, indent=2)},\n"records": [\n{lines}\n]}}\n')


def save_figure(fig: Any, path: Path, title: str = "", fontsize: float = 10) -> None:
    """Title, tight layout, a PNG at `path` (its folder made), the figure closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


class StepLog:
    """Every step a bench serves: its shape and measured (prefill, draft, verify) seconds, what
    `--validate` prices with the replay's cost model to separate step-time error from the rest."""

    def __init__(self) -> None:
        self.steps: list[tuple[StepShape, tuple[float, float, float]]] = []

    def update(self, record: Any) -> None:
        o = record.outcome
        self.steps.append((StepShape.of(record), (o.prefill_s, o.draft_s, o.verify_s)))


def logged_steps(log: list[tuple[Any, tuple[float, float, float]]]) -> list[dict[str, Any]]:
    """A run's step log as JSON rows: each step's shape and its measured seconds by part."""
    return [{**asdict(shape), **dict(zip(PARTS, seconds))} for shape, seconds in log]


def step_error(cost: Any, log: list[tuple[Any, tuple[float, float, float]]]) -> dict[str, float]:
    """The replay's cost model on a run's own measured steps: its summed (prefill, draft,
    verify, total) seconds over the measured ones, minus 1 (+0.10: the replay's clock runs 10%
    slow on exactly these steps)."""
    predicted = np.asarray(cost.predict_parts([shape for shape, _ in log]), dtype=np.float64).sum(0)
    measured = np.array([seconds for _, seconds in log], dtype=np.float64).sum(0)
    out = {part: float(p / m - 1) if m > 0 else float("nan") for part, p, m in zip(("prefill", "draft", "verify"),
                                                                                  predicted, measured)}  # fmt: skip
    return out | {"total": float(predicted.sum() / measured.sum() - 1)}


def fitted_cost(fp: Fingerprint, log: list[tuple[Any, tuple[float, float, float]]], what: str) -> StepCostModel:
    """A frozen step-cost model fitted on one run's own measured steps (`what` names the run).

    A replay priced by it against the same run on the engine shows the replay's own error (its
    batching, scheduling and clock) apart from the profile's: on a machine whose speed moves by
    tens of percent between minutes (the 2-core CPU's memory bandwidth does), a profile
    measured at another time prices every step of a run alike off."""
    if not log:
        raise ValueError(f"no steps to fit a step-cost model on ({what})")
    shapes = [shape for shape, _ in log]
    seconds = np.array([s for _, s in log], dtype=np.float64).reshape(len(log), len(PARTS))
    return StepCostProfile.from_steps(fp, shapes, seconds, {"fitted_on": what}).model(refine=False)
