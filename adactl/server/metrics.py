"""The server's Prometheus metrics (`GET /metrics`), each defined once here.

Every metric is prefixed `adactl_`. Counters grow over the server's life; a scraper takes
rates (`rate(adactl_accepted_tokens_total[1m]) / rate(adactl_verified_tokens_total[1m])` is
the acceptance rate). Each `ServerMetrics` has its own registry, so several servers (tests)
live in one process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from adactl.interface import StepRecord
from adactl.metrics import MISSES, PROMETHEUS, TOKENS_PER_S, TPOT, TTFT_P50, UNITS
from adactl.runtime.types import RequestResult, RequestView

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


class ServerMetrics:
    """What `adactl serve` reports: requests by outcome, tokens, acceptance, step time,
    unit-deadline misses, controller fallbacks, rejections, and the engine's state now."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "adactl_requests", "Finished requests by outcome (stop, length, cancelled, ...)", ["outcome"], registry=r
        )
        self.rejections = Counter(
            "adactl_rejections",
            "Requests refused, by reason (invalid, overloaded, queue_timeout)",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("adactl_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter(PROMETHEUS[TOKENS_PER_S], "Tokens emitted", registry=r)
        self.drafted_tokens = Counter("adactl_drafted_tokens", "Draft tokens proposed", registry=r)
        self.verified_tokens = Counter("adactl_verified_tokens", "Draft tokens sent to the target", registry=r)
        self.accepted_tokens = Counter("adactl_accepted_tokens", "Draft tokens accepted by the target", registry=r)
        self.steps = Counter("adactl_steps", "Engine steps run", registry=r)
        self.step_seconds = Histogram(
            "adactl_step_seconds", "Wall seconds per engine step", buckets=_STEP_BUCKETS, registry=r
        )
        self.ttft_seconds = Histogram(
            PROMETHEUS[TTFT_P50], "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot_seconds = Histogram(
            PROMETHEUS[TPOT],
            "Mean seconds per token after the first",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_units = Counter(PROMETHEUS[UNITS], "Units read by streaming consumers", registry=r)
        self.stream_misses = Counter(
            PROMETHEUS[MISSES], "Missed units: a reader's stall of d seconds counts ceil(d * rate)", registry=r
        )
        self.fallbacks = Counter(
            "adactl_controller_fallbacks", "Decisions that fell back to the safe action", ["decision"], registry=r
        )
        self.engine_errors = Counter(
            "adactl_engine_errors", "Engine steps that raised (their requests failed)", registry=r
        )
        self._fallbacks_seen: dict[str, int] = {}
        self.running = Gauge("adactl_requests_running", "Requests decoding now", registry=r)
        self.waiting = Gauge("adactl_requests_waiting", "Requests waiting for or in prefill now", registry=r)
        self.kv_bytes = Gauge("adactl_kv_cache_bytes", "Bytes held by the KV caches now", registry=r)

    def observe_step(self, record: StepRecord) -> None:
        out = record.outcome
        self.steps.inc()
        self.step_seconds.observe(out.total_s)
        self.generation_tokens.inc(out.tokens_emitted)
        self.drafted_tokens.inc(int(out.drafted.sum()))
        self.verified_tokens.inc(int(out.verified.sum()))
        self.accepted_tokens.inc(int(out.accepted.sum()))

    def sync_fallbacks(self, fallbacks: Mapping[str, int]) -> None:
        """Catch up with a `ControlLoop.fallbacks` count (decisions and failed updates alike)."""
        for what, n in fallbacks.items():
            if n > self._fallbacks_seen.get(what, 0):
                self.fallbacks.labels(decision=what).inc(n - self._fallbacks_seen.get(what, 0))
                self._fallbacks_seen[what] = n

    def observe_finished(self, result: RequestResult) -> None:
        self.requests.labels(outcome=result.finish_reason).inc()
        if result.first_token_time is not None:
            self.ttft_seconds.observe(result.first_token_time - result.arrival_time)
            n = len(result.output_ids)
            if n > 1:
                self.tpot_seconds.observe((result.finish_time - result.first_token_time) / (n - 1))
        if result.stream_units:
            self.stream_units.inc(result.stream_units)
            self.stream_misses.inc(result.stream_misses or 0)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def set_gauges(self, views: Sequence[RequestView], kv_bytes: int) -> None:
        """The engine's state now: its unfinished requests and the bytes its KV caches hold."""
        running = sum(v.status == "running" for v in views)
        self.running.set(running)
        self.waiting.set(len(views) - running)
        self.kv_bytes.set(kv_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
