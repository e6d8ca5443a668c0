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
        v, job = self.view, [self.view.job]
        summary, timeline, refused_here = v.figures()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["fedge_job"])
            g.add_metric(job, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["fedge_job"])
            c.add_metric(job, value)
            return c
        yield counter("fedge_rounds", "rounds closed", len(timeline))
        yield gauge("fedge_round", "the last closed round", summary.get("round", 0))
        if summary.get("accuracy", -1.0) >= 0:
            yield gauge("fedge_accuracy", "test accuracy after the last round",
                        summary["accuracy"])
        if summary.get("loss", -1.0) >= 0:
            yield gauge("fedge_loss", "mean training loss of the last round's updates",
                        summary["loss"])
        states = GaugeMetricFamily("fedge_devices", "devices by their last status",
                                   labels=["fedge_job", "state"])
        for state, n in v.counts().items():
            states.add_metric([v.job, state], n)
        yield states
        yield gauge("fedge_devices_online", "devices whose last status is online",
                    v.counts()["online"])
        yield gauge("fedge_devices_reporting", "devices accepted in the last round",
                    summary.get("devices_reporting", 0))
        yield gauge("fedge_devices_assigned", "devices given a task in the last round",
                    summary.get("devices_assigned", 0))
        yield counter("fedge_updates_accepted", "updates accepted, all rounds",
                      sum(r[3] for r in timeline))
        rejected = CounterMetricFamily("fedge_updates_rejected", "messages the aggregator "
                                       "refused, by reason", labels=["fedge_job", "reason"])
        for reason, n in sorted(summary.get("rejected_by_reason", {}).items()):
            rejected.add_metric([v.job, reason], n)
        yield rejected
        traffic = CounterMetricFamily("fedge_bytes", "bytes of the rounds, by direction",
                                      labels=["fedge_job", "direction"])
        traffic.add_metric([v.job, "up"], sum(r[5] for r in timeline))
        traffic.add_metric([v.job, "down"], sum(r[6] for r in timeline))
        yield traffic
        buckets, total = histogram([r[7] for r in timeline])
        h = HistogramMetricFamily("fedge_round_duration_seconds", "round duration",
                                  labels=["fedge_job"])
        h.add_metric(job, buckets, total)
        yield h
        yield counter("fedge_aggregator_cpu_seconds", "the aggregator's user + system CPU "
                      "time", summary.get("cpu_seconds", 0.0))
        yield gauge("fedge_aggregator_resident_memory_bytes", "the aggregator's RSS after "
                    "the last round", summary.get("rss_bytes", 0))
        mine = CounterMetricFamily("fedge_dashboard_refused", "messages this dashboard "
                                   "refused (signature, replay, content)",
                                   labels=["fedge_job", "reason"])
        for reason, n in sorted(refused_here.items()):
            mine.add_metric([v.job, reason], n)
        yield mine


def registry_for(view: FleetView) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(JobCollector(view))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
