"""Serving metrics, named and computed once: what benches report, plots draw and bars judge.

- `TTFT_P50`, `TTFT_P99`, `TPOT`, `TPOT_P99`, `MISS_RATE`, `TOKENS_PER_S`, `UNITS`, `MISSES`:
  the record keys every bench uses, and (`tensorboard(name)`) train/ppo.py's scalars;
- `PROMETHEUS`: the same quantities' metric names in `adactl serve`'s /metrics;
- `SLO_MISS_RATE`: the unit-miss rate a stream's readers tolerate (the bar of capacity at SLO);
- `tpot(first, last, tokens)`: seconds per output token after the first;
- `latency_summary(ttft, tpot)`: the TTFT percentiles and TPOT mean (and p99) of a run;
- `on_tpot_slo(result, bound)`: whether a request kept its TPOT SLO (`ATTAINMENT` is the share
  that did, `SLO_GOODPUT` their tokens per second);
- `latencies(results)`, `unit_misses(results)`: a run's TTFTs and TPOTs, and its readers'
  units and misses, from the engine's `RequestResult`s (`serving_summary`: all of it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

TTFT_P50 = "ttft_p50_s"
TTFT_P99 = "ttft_p99_s"
TPOT = "tpot_s"
TPOT_P99 = "tpot_p99_s"
MISS_RATE = "miss_rate"
TOKENS_PER_S = "tokens_per_s"
UNITS = "units"
MISSES = "misses"
ATTAINMENT = "attainment"
SLO_GOODPUT = "slo_goodput"

PROMETHEUS = {
    TTFT_P50: "adactl_time_to_first_token_seconds",  # a histogram: its quantiles are the TTFTs
    TPOT: "adactl_time_per_output_token_seconds",
    UNITS: "adactl_stream_units",  # counters (_total): MISS_RATE = misses / units
    MISSES: "adactl_stream_misses",
    TOKENS_PER_S: "adactl_generation_tokens",  # a counter: its rate is tokens/s
}


def tensorboard(name: str) -> str:
    """The TensorBoard scalar of a metric (train/ppo.py logs under adactl/)."""
    return f"adactl/{name}"


SLO_MISS_RATE = 0.005
"""At most this share of stream units may be late for a load to count as served at SLO."""


def tpot(first: float, last: float, tokens: int) -> float | None:
    """Time per output token after the first (None for a one-token output)."""
    return (last - first) / (tokens - 1) if tokens > 1 else None


def latency_summary(ttft: Sequence[float], tpots: Sequence[float], tpot_p99: bool = False) -> dict[str, float | None]:
    """TTFT p50 and p99 and mean TPOT of one run (None where a list is empty); with
    `tpot_p99`, the TPOT p99 too."""
    out: dict[str, float | None] = {
        TTFT_P50: percentile(ttft, 50),
        TTFT_P99: percentile(ttft, 99),
        TPOT: float(np.mean(tpots)) if len(tpots) else None,
    }
    if tpot_p99:
        out[TPOT_P99] = percentile(tpots, 99)
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """numpy's linear percentile, except that one between two infinite values (rejected
    requests count as an infinite TTFT) is infinite, not NaN; None for no values."""
    if not len(values):
        return None
    with np.errstate(invalid="ignore"):  # inf - inf while interpolating: handled below
        value = float(np.percentile(values, q))
    return math.inf if math.isnan(value) else value


def latencies(results: Iterable[Any]) -> tuple[list[float], list[float]]:
    """TTFT (from arrival) of every request that produced a token, and TPOT of every one that
    produced two or more, from `RequestResult`s."""
    ttft, tpots = [], []
    for r in results:
        if r.first_token_time is None:
            continue
        ttft.append(r.first_token_time - r.arrival_time)
        per_token = tpot(r.first_token_time, r.finish_time, len(r.output_ids))
        if per_token is not None:
            tpots.append(per_token)
    return ttft, tpots


def unit_misses(results: Iterable[Any]) -> tuple[int, int]:
    """(units, missed units: a stall of d s counts ceil(d * rate)) over the streaming requests of
    `RequestResult`s."""
    units = misses = 0
    for r in results:
        units += r.stream_units or 0
        misses += r.stream_misses or 0
    return units, misses


def serving_summary(results: Sequence[Any], wall_s: float) -> dict[str, Any]:
    """A served run's record: tokens/s, TTFT/TPOT, unit misses and the miss rate."""
    units, misses = unit_misses(results)
    tokens = sum(len(r.output_ids) for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        TOKENS_PER_S: tokens / max(wall_s, 1e-9),
        **latency_summary(*latencies(results)),
        UNITS: units,
        MISSES: misses,
        MISS_RATE: misses / max(units, 1),
        "wall_s": wall_s,
    }


def on_tpot_slo(result: Any, bound_s: float) -> bool:
    """Whether a finished request kept its time per output token within `bound_s` (a
    one-token reply always does)."""
    first = result.first_token_time or result.finish_time
    return (tpot(first, result.finish_time, len(result.output_ids)) or 0.0) <= bound_s
