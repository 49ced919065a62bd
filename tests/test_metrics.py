"""The serving metrics every bench reports, computed in one place."""

from __future__ import annotations

import math

import pytest

from adactl import metrics


def test_tpot_is_time_per_token_after_the_first():
    assert metrics.tpot(1.0, 3.0, 5) == pytest.approx(0.5)
    assert metrics.tpot(1.0, 1.0, 1) is None


def test_latency_summary_percentiles_and_empty_runs():
    ttft = [0.1 * i for i in range(1, 101)]
    out = metrics.latency_summary(ttft, [0.02, 0.04], tpot_p99=True)
    assert out[metrics.TTFT_P50] == pytest.approx(5.05)
    assert out[metrics.TTFT_P99] == pytest.approx(9.901)
    assert out[metrics.TPOT] == pytest.approx(0.03)
    assert out[metrics.TPOT_P99] == pytest.approx(0.0398)
    assert metrics.latency_summary([], []) == {metrics.TTFT_P50: None, metrics.TTFT_P99: None, metrics.TPOT: None}
    # a rejected request counts as an infinite TTFT: it lands in the tail, not in the median
    assert math.isinf(metrics.latency_summary([0.1] * 98 + [math.inf] * 2, [])[metrics.TTFT_P99])


def test_one_name_per_quantity_in_records_tensorboard_and_prometheus():
    from adactl.server.metrics import ServerMetrics

    exposed = ServerMetrics().render().decode()
    for key, name in metrics.PROMETHEUS.items():  # counters are exposed with _total
        assert f"# TYPE {name} " in exposed or f"# TYPE {name}_total counter" in exposed, (key, name)
    assert metrics.tensorboard(metrics.MISS_RATE) == "adactl/miss_rate"
    summary = metrics.serving_summary([], 1.0)
    assert {metrics.TOKENS_PER_S, metrics.UNITS, metrics.MISSES, metrics.MISS_RATE, metrics.TTFT_P99} <= set(summary)


def test_on_tpot_slo_judges_time_per_token_after_the_first():
    from types import SimpleNamespace

    reply = SimpleNamespace(first_token_time=1.0, finish_time=2.0, output_ids=[1] * 11)  # 0.1 s per token
    assert metrics.on_tpot_slo(reply, 0.1) and not metrics.on_tpot_slo(reply, 0.09)
    one = SimpleNamespace(first_token_time=1.0, finish_time=1.0, output_ids=[1])
    assert metrics.on_tpot_slo(one, 0.0)
