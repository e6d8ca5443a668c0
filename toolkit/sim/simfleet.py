"""``fedge simulate --broker URL --procs K``: the devices in K worker processes, each
device its own MQTT client; the aggregator alone in this process.

Devices are dealt round-robin over the workers (``python -m toolkit.sim.simworker``).
Only plain JSON crosses the process boundary: a spec per worker (job, broker,
dataset name, and per device its id, profile and sample indices) and, at the end,
each agent's ``history``. The aggregator's ``watch`` polls the workers while it
waits, so a worker that dies ends the run with ``SimulationError`` naming it instead
of a round that waits for its devices forever. Since this process runs only the
aggregator (and a ``$SYS`` listener), its CPU time and memory are the aggregator's:
``toolkit.sim.fleetstats`` adds them per round, with the broker's throughput.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from device_runtime import threads
from toolkit.errors import SimulationError
from toolkit.planning.profiles import DeviceProfile

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SimDevice:
    """What the report needs of one device, wherever its agent ran."""

    device: str
    samples: int
    history: list[dict]


@dataclass
class _Worker:
    index: int
    devices: list[str]
    proc: subprocess.Popen
    result: Path
    log: Path


class DeviceProcesses:
    """K worker processes holding the fleet's agents."""

    def __init__(self, broker: str, job: str, workdir: Path,
                 custom_models: tuple[str, ...] = ()):
        self.broker, self.job, self.workdir = broker, job, workdir
        self.custom_models = custom_models  # LocalModels.specs() the agents may build
        self.workers: list[_Worker] = []

    def start(self, x: np.ndarray, y: np.ndarray, fleet: list[DeviceProfile],
              shards: list[np.ndarray], procs: int, keys) -> None:
        """Start the workers; device k (shard k: its indices into ``x``, ``y``) goes to
        worker k mod procs."""
        data = {"x": str(self.workdir / "x.npy"), "y": str(self.workdir / "y.npy")}
        np.save(data["x"], x, allow_pickle=False)
        np.save(data["y"], y, allow_pickle=False)
        env = dict(threads.child_env(procs + 1), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                            os.environ.get("PYTHONPATH")])))
        for w in range(min(procs, len(fleet))):
            ks = range(w, len(fleet), procs)  # round-robin: every profile in every worker
            spec = {"job": self.job, "broker": self.broker, **data,
                    "allow_custom_model": list(self.custom_models),
                    "devices": [{"id": f"dev-{k}", "profile": fleet[k].name,
                                 "index": shards[k].tolist()} for k in ks],
                    "keys": keys.to_json([f"dev-{k}" for k in ks])}
            path = self.workdir / f"worker-{w}.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private keys
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(spec))
            log = self.workdir / f"worker-{w}.log"
            result = self.workdir / f"worker-{w}.result.json"
            with open(log, "wb") as err:
                proc = subprocess.Popen([sys.executable, "-m", "toolkit.sim.simworker", str(path),
                                         str(result)], stdout=subprocess.DEVNULL, stderr=err,
                                        env=env, cwd=ROOT)
            self.workers.append(_Worker(w, [d["id"] for d in spec["devices"]], proc, result, log))

    def check(self) -> None:
        """Raise if a worker exited while the job runs (the aggregator's ``watch``)."""
        for w in self.workers:
            if w.proc.poll() is not None:
                raise SimulationError(f"{self._name(w)} exited with code {w.proc.returncode} "
                                      f"during the job: {self._last_line(w)}")

    def collect(self, timeout: float) -> tuple[list[SimDevice], list[dict]]:
        """After the job's stop: every worker's devices (in device order) and its own
        figures (CPU seconds, peak RSS)."""
        deadline = time.time() + timeout
        devices: dict[str, SimDevice] = {}
        stats = []
        for w in self.workers:
            try:
                w.proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise SimulationError(f"{self._name(w)} did not finish within {timeout:g}s "
                                      "of the job's end") from None
            if w.proc.returncode != 0 or not w.result.exists():
                raise SimulationError(f"{self._name(w)} exited with code "
                                      f"{w.proc.returncode}: {self._last_line(w)}")
            out = json.loads(w.result.read_text())
            for d in out["devices"]:
                devices[d["id"]] = SimDevice(d["id"], d["samples"], d["history"])
            stats.append({"devices": len(w.devices), "cpu_seconds": out["cpu_seconds"],
                          "peak_rss_mb": out["peak_rss_mb"]})
        order = sorted(devices, key=lambda d: int(d.split("-")[1]))
        return [devices[d] for d in order], stats

    def stop(self) -> None:
        """Kill whatever is still running (after a failure); each by its own pid."""
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(10)

    def _name(self, w: _Worker) -> str:
        shown = ", ".join(w.devices[:3]) + (", ..." if len(w.devices) > 3 else "")
        return f"device process {w.index} (pid {w.proc.pid}, {len(w.devices)} devices: {shown})"

    @staticmethod
    def _last_line(w: _Worker) -> str:
        try:
            lines = [ln for ln in w.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        return lines[-1].strip() if lines else "no output"


def run_fleet(opts, job: str, data: tuple[np.ndarray, np.ndarray], fleet: list[DeviceProfile],
              shards: list[np.ndarray], make_aggregator: Callable,
              on_round: Callable[[dict], None] | None, keys
              ) -> tuple[object, dict, list[SimDevice]]:
    """Run the job with the devices in ``opts.procs`` processes; returns (aggregator,
    report, devices). ``data`` is the training set (x, y) that ``shards`` index;
    ``make_aggregator(transport, on_round)`` builds the Aggregator."""
    from device_runtime.transport.mqtt import MqttTransport
    from toolkit.sim.fleetstats import BrokerMonitor, FleetMeter
    from toolkit.sim.simworker import raise_fd_limit

    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="fedge-fleet-") as work:
        procs = DeviceProcesses(opts.broker, job, Path(work),
                                tuple(opts.custom_models().specs()))
        monitor = BrokerMonitor(opts.broker, f"{job}-sys")
        agg_t = MqttTransport(opts.broker, f"{job}-aggregator", persistent=True)
        try:
            agg_t.connect()
            procs.start(*data, fleet, shards, opts.procs, keys)
            meter = FleetMeter(monitor, on_round)
            agg = make_aggregator(agg_t, meter)
            agg.watch = procs.check
            report = agg.run()
            devices, workers = procs.collect(timeout=120)
            fleet_figures = meter.finish()
        finally:
            procs.stop()
            agg_t.close()
            monitor.close()
    report["fleet"] = {"procs": len(workers), "workers": workers, **fleet_figures}
    return agg, report, devices
