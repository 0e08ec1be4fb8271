"""`/metrics`: the store's totals in Prometheus' text format, read from the store at scrape time (a
collector of our own on a registry of our own: nothing is counted in the dashboard's memory, so a
restarted dashboard reports the same numbers, and several dashboards on one store agree)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral.store import Store

RATE_WINDOW = 10.0  # seconds over which corral_events_per_second is taken


class StoreCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        store = self.store
        now = datetime.now(UTC)
        counts = store.counts()
        running = GaugeMetricFamily("corral_sandboxes_running", "Sandboxes started and not stopped")
        running.add_metric([], counts["running"])
        yield running
        sandboxes = CounterMetricFamily("corral_sandboxes", "Sandboxes recorded in the audit store")
        sandboxes.add_metric([], counts["sandboxes"])
        yield sandboxes
        commands = CounterMetricFamily("corral_commands", "Commands run in sandboxes (exec.start events)")
        commands.add_metric([], store.type_count("exec.start"))
        yield commands
        alerts = CounterMetricFamily("corral_alerts", "Alerts raised", labels=["category", "severity"])
        for category, severity, n in store.alert_counts():
            alerts.add_metric([category, severity], n)
        yield alerts
        denials = CounterMetricFamily("corral_denials", "Denials recorded, by layer", labels=["layer"])
        for layer, n in store.deny_counts():
            denials.add_metric([layer], n)
        yield denials
        events = CounterMetricFamily("corral_events", "Events committed to the audit store")
        events.add_metric([], counts["events"])
        yield events
        rate = GaugeMetricFamily(
            "corral_events_per_second", f"Events with a time in the last {RATE_WINDOW:g} s, per second"
        )
        rate.add_metric([], store.events_since(now - timedelta(seconds=RATE_WINDOW)) / RATE_WINDOW)
        yield rate
        lag = GaugeMetricFamily(
            "corral_store_lag_seconds",
            "Seconds since the store's last commit while any sandbox runs (0 when none does): a "
            "writer that stopped committing shows as a growing lag",
        )
        last = store.last_commit()
        lag.add_metric(
            [], max((now - last).total_seconds(), 0.0) if counts["running"] and last is not None else 0.0
        )
        yield lag


def registry(store: Store) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(store))
    return reg
