"""Metrics (ebbcast.core.metrics) on a fresh registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ebbcast.core.metrics import Metrics


def test_metrics_on_a_fresh_registry_start_at_zero_with_every_label():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert metrics.registry is registry
    text = metrics.exposition().decode()
    for reason in ("client", "ping_timeout", "slow_consumer", "too_big", "policy",
                   "drain_deadline", "forced", "error"):
        assert f'ebbcast_disconnections_total{{reason="{reason}"}} 0.0' in text
    metrics.drain_started_at(100.0, 1900.0)
    assert registry.get_sample_value("ebbcast_draining") == 1
    assert registry.get_sample_value("ebbcast_drain_deadline_timestamp_seconds") == 1900.0
    Metrics()  # a second instance on its own registry does not clash
