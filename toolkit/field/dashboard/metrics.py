"""``/metrics``: the job's figures in Prometheus' text format (prometheus-client).

A collector reads the dashboard's view at scrape time, so the figures are those of the
last verified round summary and the devices' statuses; nothing is kept twice. Counters
are the aggregator's own running totals (a restarted aggregator starts its refusal
counts again, which Prometheus reads as a counter reset). Every family carries the
label ``fedge_job`` (``job`` is Prometheus' own).
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

from toolkit.field.dashboard.view import FleetView

# Round duration buckets, seconds: a round takes from a second (a simulated fleet) to an
# hour (phones that train when charging).
BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def histogram(values: list[float]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets (with +Inf) and the sum of ``values``."""
    buckets = [(floatToGoString(b), float(sum(1 for v in values if v <= b))) for b in BUCKETS]
    return buckets + [("+Inf", float(len(values)))], float(sum(values))


class JobCollector:
    def __init__(self, view: FleetView):
        self.view = view

    def collect(self) -> Iterator:
        summary, timeline, refused_here = self.view.figures()
        yield from self._rounds(summary, timeline)
        yield from self._traffic(summary, timeline)
        yield self._labelled(CounterMetricFamily, "fedge_dashboard_refused",
                             "messages this dashboard refused (signature, replay, content)",
                             "reason", refused_here)

    def _one(self, kind, name: str, doc: str, value: float):
        m = kind(name, doc, labels=["fedge_job"])
        m.add_metric([self.view.job], value)
        return m

    def _labelled(self, kind, name: str, doc: str, label: str, values: dict):
        m = kind(name, doc, labels=["fedge_job", label])
        for key, n in sorted(values.items()):
            m.add_metric([self.view.job, key], n)
        return m

    def _rounds(self, summary: dict, timeline: list) -> Iterator:
        G, C = GaugeMetricFamily, CounterMetricFamily
        yield self._one(C, "fedge_rounds", "rounds closed", len(timeline))
        yield self._one(G, "fedge_round", "the last closed round", summary.get("round", 0))
        if summary.get("accuracy", -1.0) >= 0:
            yield self._one(G, "fedge_accuracy", "test accuracy after the last round",
                            summary["accuracy"])
        if summary.get("loss", -1.0) >= 0:
            yield self._one(G, "fedge_loss", "mean training loss of the last round's "
                            "updates", summary["loss"])
        counts = self.view.counts()
        yield self._labelled(G, "fedge_devices", "devices by their last status", "state",
                             counts)
        yield self._one(G, "fedge_devices_online", "devices whose last status is online",
                        counts["online"])
        yield self._one(G, "fedge_devices_reporting", "devices accepted in the last round",
                        summary.get("devices_reporting", 0))
        yield self._one(G, "fedge_devices_assigned", "devices given a task in the last "
                        "round", summary.get("devices_assigned", 0))
        yield self._one(C, "fedge_updates_accepted", "updates accepted, all rounds",
                        sum(r[3] for r in timeline))
        yield self._labelled(C, "fedge_updates_rejected", "messages the aggregator "
                             "refused, by reason", "reason",
                             summary.get("rejected_by_reason", {}))

    def _traffic(self, summary: dict, timeline: list) -> Iterator:
        yield self._labelled(CounterMetricFamily, "fedge_bytes", "bytes of the rounds, by "
                             "direction", "direction", {"up": sum(r[5] for r in timeline),
                                                        "down": sum(r[6] for r in timeline)})
        buckets, total = histogram([r[7] for r in timeline])
        h = HistogramMetricFamily("fedge_round_duration_seconds", "round duration",
                                  labels=["fedge_job"])
        h.add_metric([self.view.job], buckets, total)
        yield h
        yield self._one(CounterMetricFamily, "fedge_aggregator_cpu_seconds", "the "
                        "aggregator's user + system CPU time", summary.get("cpu_seconds", 0.0))
        yield self._one(GaugeMetricFamily, "fedge_aggregator_resident_memory_bytes", "the "
                        "aggregator's RSS after the last round", summary.get("rss_bytes", 0))


def registry_for(view: FleetView) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(JobCollector(view))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
