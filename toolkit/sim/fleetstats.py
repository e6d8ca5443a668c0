"""Fleet-scale figures for ``fedge simulate --procs``: what the aggregator costs per
round, and what the broker carried.

Two independent views of traffic, reported side by side:
- ``frame_*``: the fedge payloads the aggregator counted for the round (updates in;
  per device the task and the model it fetches), over the round's wall time. No MQTT
  headers, acks, status messages or cleared retained messages.
- ``broker_*``: Mosquitto's own counters (``$SYS/broker/bytes/received`` etc.,
  ``man 8 mosquitto``), sampled every ``sys_interval`` seconds (Mosquitto's default
  is 10 s; the benchmark sets 1), interpolated linearly at the round's start and end.
  Everything the broker moved, for any client: headers, acks and all. A broker
  without these topics leaves them None.
"""
from __future__ import annotations

import os
import resource
import threading
import time
from typing import Callable

import numpy as np

SYS_COUNTERS = {
    "bytes_received": "$SYS/broker/bytes/received",
    "bytes_sent": "$SYS/broker/bytes/sent",
    "messages_received": "$SYS/broker/messages/received",
    "messages_sent": "$SYS/broker/messages/sent",
    "publish_received": "$SYS/broker/publish/messages/received",
    "publish_sent": "$SYS/broker/publish/messages/sent",
}
DROPPED = "$SYS/broker/publish/messages/dropped"  # a total, reported as is
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """This process's resident set size now (``/proc/self/statm``, Linux)."""
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * PAGE / 2**20, 1)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


NO_SYS = ("broker throughput not measured: the broker published no $SYS counters during "
          "the job (Mosquitto: set sys_interval 1 in its configuration; amqtt and the "
          "embedded broker publish none)")


class BrokerMonitor:
    """A separate client that records Mosquitto's ``$SYS`` counters as they arrive."""

    def __init__(self, url: str, client_id: str):
        from device_runtime.transport.mqtt import MqttTransport

        self.series: dict[str, list[tuple[float, float]]] = {k: [] for k in SYS_COUNTERS}
        self.dropped: float | None = None
        self._lock = threading.Lock()
        self._names = {t: k for k, t in SYS_COUNTERS.items()}
        self.t = MqttTransport(url, client_id)
        self.t.connect()
        self.t.subscribe("$SYS/broker/#", self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        try:
            value = float(payload)
        except ValueError:
            return
        with self._lock:
            if topic == DROPPED:
                self.dropped = value
            elif topic in self._names:
                self.series[self._names[topic]].append((time.time(), value))

    def rates(self, t0: float, t1: float) -> dict[str, float | None]:
        """Per counter, its growth per second over [t0, t1], the window clipped to the
        samples received (None when under a second of it is covered)."""
        out: dict[str, float | None] = {}
        with self._lock:
            for name, s in self.series.items():
                a, b = (max(t0, s[0][0]), min(t1, s[-1][0])) if s else (0.0, 0.0)
                if b - a < 1.0:
                    out[name] = None
                    continue
                ts, vs = np.array(s).T
                out[name] = round(float((np.interp(b, ts, vs) - np.interp(a, ts, vs)) / (b - a)),
                                  1)
        return out

    def close(self) -> None:
        self.t.close(flush_timeout=1.0)


class FleetMeter:
    """The aggregator's ``on_round``: notes each round's CPU (``process_time`` of this
    process, which runs only the aggregator), RSS and window, then calls ``then``."""

    def __init__(self, monitor: BrokerMonitor | None, then: Callable[[dict], None] | None):
        self.monitor, self.then = monitor, then
        self.cpu = time.process_time()
        self.records: list[dict] = []

    def __call__(self, rec: dict) -> None:
        now = time.process_time()
        # Round 1 also pays for the start: every device's status, the plan, the assets.
        rec["aggregator_cpu_seconds"] = round(now - self.cpu, 3)
        rec["aggregator_rss_mb"] = rss_mb()
        rec["closed"] = time.time()
        secs = max(rec["seconds"], 1e-9)
        rec["frame_bytes_per_s"] = round((rec["uplink_bytes"] + rec["downlink_bytes"]) / secs)
        self.cpu = now
        self.records.append(rec)
        if self.then:
            self.then(rec)

    def finish(self) -> dict:
        """Add the broker's rates to every round (now that samples after its end are in);
        returns the job's own figures."""
        for rec in self.records:
            rates = self.monitor.rates(rec["closed"] - rec["seconds"], rec["closed"]) \
                if self.monitor else {}
            rec.update({f"broker_{k}_per_s": rates.get(k) for k in SYS_COUNTERS})
        job = {}
        if self.records and self.monitor:
            first = self.records[0]
            job = self.monitor.rates(first["closed"] - first["seconds"],
                                     self.records[-1]["closed"])
        out = {"aggregator_peak_rss_mb": peak_rss_mb(),
               "broker_job": {f"{k}_per_s": v for k, v in job.items()},
               "broker_publish_dropped_total": self.monitor.dropped if self.monitor else None}
        if not any(v is not None for v in job.values()):
            # null is not "zero traffic": say why there is no figure
            out["broker_note"] = NO_SYS
        return out
