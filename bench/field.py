"""Benchmark the field loop's plumbing: broker throughput and round orchestration.

1. Throughput: one publisher, one subscriber, QoS 1 frames of 1 KB .. 8 MB
   through the embedded amqtt broker and a private Mosquitto, side by side;
   frames/s and MB/s (median of --repeats runs).
2. Orchestration overhead per round for 4, 16 and 64 devices: the aggregator
   over Mosquitto with devices that answer at once (they echo the model, so
   training time is zero); the round's whole cycle, from its start to the next
   round's, is then all overhead: publishing the model and tasks, fetching,
   decoding, validating, aggregating, checkpointing.
   The devices run in a process of their own (forked first), so that their work
   does not hold this process's GIL; the aggregator's own CPU per round is recorded.

    python bench/field.py --json docs/results/field.json --md docs/results/field.md
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (command, cpu_ticks, machine, steal_share,  # noqa: E402
                          write_results)

from broker_server.embedded import EmbeddedBroker  # noqa: E402
from broker_server.service import Aggregator, ServeOptions  # noqa: E402
from broker_server.trust import ServerTrust  # noqa: E402
from device_runtime import heap, wire  # noqa: E402
from device_runtime.transport.base import DEFAULT_MAX_PAYLOAD  # noqa: E402
from device_runtime.agent import AgentOptions, DeviceAgent, status_will  # noqa: E402
from device_runtime.keys import FleetKeys  # noqa: E402
from device_runtime.topics import Topics  # noqa: E402
from device_runtime.uplinks import Uplink  # noqa: E402
from device_runtime.transport.mqtt import MqttTransport  # noqa: E402
from testkit.brokers import Mosquitto  # noqa: E402

SIZES = [1 << 10, 16 << 10, 128 << 10, 1 << 20, 8 << 20]


def throughput(url: str, size: int, count: int) -> dict:
    # fedge's default payload limit (128 KB): larger frames travel as chunks, as in a
    # deployment (amqtt drops connections on ~1 MB packets).
    pub = MqttTransport(url, f"bench-pub-{size}")
    sub = MqttTransport(url, f"bench-sub-{size}")
    pub.connect(), sub.connect()
    got: queue.Queue = queue.Queue()
    sub.subscribe("bench/t", lambda t, p: got.put(len(p)))
    time.sleep(0.3)
    payload = wire.encode(wire.Frame("bench", "b", 0, "d", "fp32",
                                     {"x": np.zeros(max(1, (size - 300) // 4), np.float32)}))
    t0 = time.perf_counter()
    for _ in range(count):
        pub.publish("bench/t", payload)
    try:
        for _ in range(count):
            got.get(timeout=60)
    except queue.Empty:
        return {"frames_per_s": None, "mb_per_s": None}  # the broker lost the stream
    finally:
        pub.close(), sub.close()
    secs = time.perf_counter() - t0
    return {"frames_per_s": count / secs, "mb_per_s": count * len(payload) / secs / 1e6}


def run_throughput(url: str, repeats: int) -> list[dict]:
    rows = []
    for size in SIZES:
        count = int(min(500, max(4, (32 << 20) // size)))
        runs = [throughput(url, size, count) for _ in range(repeats)]
        ok = [r for r in runs if r["frames_per_s"] is not None]
        if len(ok) < len(runs):  # a broker that failed once is not measured further
            rows.append({"size": size, "frames": count, "frames_per_s": None,
                         "mb_per_s": None, "failed_runs": len(runs) - len(ok)})
            continue
        rows.append({"size": size, "frames": count,
                     "frames_per_s": round(statistics.median(r["frames_per_s"] for r in ok), 1),
                     "mb_per_s": round(statistics.median(r["mb_per_s"] for r in ok), 2)})
    return rows


class EchoAgent(DeviceAgent):
    """Answers every task at once with the model it got, signed: zero training time."""

    def uplink(self, kind: str) -> Uplink:
        base = super().uplink(kind)
        return Uplink(self._echo, base.asset, base.passes) if kind == "weights" else base

    # The farm's devices share one core here, where in the field each has its own: a
    # model is decoded once per farm, not once per device (each still fetches it,
    # checks the aggregator's signature on it, and signs its own update).
    decoded: dict[str, dict] = {}

    @staticmethod
    def _echo(agent, task, frame_bytes: bytes) -> bytes:
        tensors = EchoAgent.decoded.get(task.model_sha256)
        if tensors is None:
            tensors = wire.decode(frame_bytes).tensors
            EchoAgent.decoded.clear()
            EchoAgent.decoded[task.model_sha256] = tensors
        return wire.encode(wire.Frame(
            "update", agent.opts.job, task.round, agent.device, "fp32", tensors,
            meta={"samples": 10, "train_seconds": 0.0}, nonce=task.nonce), signer=agent.key)


def _echo_fleet(url: str, job: str, keys: FleetKeys, devices: list[int], ready, stop,
                cpu, max_payload: int) -> None:
    """The devices, in a process of their own (as in the field, where each has its own
    CPU): connected, answering every task until ``stop``."""
    topics, transports = Topics(job), []
    for k in devices:
        dev = f"d{k}"
        t = MqttTransport(url, f"{job}-{dev}", will=status_will(topics, dev, keys.device(dev)),
                          max_payload=max_payload)
        t.connect()
        a = EchoAgent(t, AgentOptions(job, dev, "rpi4", key=keys.device(dev),
                                      server_key=keys.server.public),
                      np.zeros((10, 40), np.float32), np.zeros(10, np.int64))
        threading.Thread(target=a.run, daemon=True).start()
        transports.append(t)
    c0 = time.process_time()
    ready.set()
    stop.wait()
    cpu.value = time.process_time() - c0  # the devices' own work, all rounds
    for t in transports:
        t.close()


class TimedAggregator(Aggregator):
    """Records each round's whole cycle (from its start to the next round's: the record's
    own ``seconds`` stop before the checkpoint is written and the round before's models
    are cleared) and its CPU time in the aggregator's thread (its own work: the part
    that grows with the fleet)."""

    def _run_round(self, r: int) -> None:
        w0, t0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        super()._run_round(r)
        self.state.history[-1]["cycle_s"] = round(time.perf_counter() - w0, 4)
        # pages the server process faulted in (device_runtime/heap.py keeps them)
        self.state.history[-1]["page_faults"] = \
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        self.state.history[-1]["aggregator_cpu_s"] = round(time.thread_time() - t0, 4)
        # and with its network, syncer and downlink threads: the server's whole CPU
        self.state.history[-1]["server_process_cpu_s"] = round(time.process_time() - p0, 4)


def orchestration(url: str, devices: int, rounds: int, procs: int = 1,
                  max_payload: int = DEFAULT_MAX_PAYLOAD) -> dict:
    from device_runtime.training.local import weights_of
    from device_runtime.training.models import ModelConfig, build_model

    from toolkit.strategies.setups import check_strategy

    check_strategy("fedavg")  # makes FedAvg's rule known to the aggregator, as serve does
    job = f"orch{devices}-{int(time.time() * 1000) % 100000}"
    cfg = ModelConfig("cnn1d", (40,), 10)
    keys = FleetKeys()
    for k in range(devices):
        keys.device(f"d{k}")
    # Forked before this process opens any connection or starts a thread of its own;
    # ``procs`` processes share the devices (one: 16 agents and their network threads
    # take turns at one interpreter lock, which a fleet of real devices never does).
    # as `fedge device` and `fedge serve` do (toolkit/cli/main.py): the forked devices
    # keep a device's share of freed heap, this process then an aggregator's
    heap.keep_freed(heap.DEVICE_RETAIN)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    fleet = []
    for p in range(procs):
        ready, cpu = ctx.Event(), ctx.Value("d", 0.0)
        proc = ctx.Process(target=_echo_fleet, args=(url, job, keys, list(
            range(p, devices, procs)), ready, stop, cpu, max_payload))
        proc.start()
        fleet.append((proc, ready, cpu))
    ticks = cpu_ticks()
    try:
        if not all(ready.wait(120) for _, ready, _ in fleet):
            raise RuntimeError(f"{devices} echo devices did not connect within 120 s")
        heap.keep_freed(heap.SERVER_RETAIN)
        agg_t = MqttTransport(url, f"{job}-agg", persistent=True, max_payload=max_payload)
        agg_t.connect()
        with tempfile.TemporaryDirectory() as state:
            agg = TimedAggregator(agg_t, ServeOptions(job, Path(state), rounds=rounds,
                                                      min_devices=devices, round_timeout=120),
                                  cfg.to_json(), weights_of(build_model(cfg)),
                                  trust=ServerTrust(job, keys.server, keys, Path(state)))
            report = agg.run()
        agg_t.close()
    finally:
        stop.set()
        for proc, _, _ in fleet:
            proc.join(60)
    later = report["rounds"][1:]  # round 1 includes start-up
    return {"devices": devices, "rounds": rounds,
            "overhead_s_median": round(statistics.median(r["cycle_s"] for r in later), 3),
            "record_seconds_median": round(statistics.median(r["seconds"] for r in later), 3),
            "aggregator_cpu_s_median": round(statistics.median(
                r["aggregator_cpu_s"] for r in later), 4),
            "server_process_cpu_s_median": round(statistics.median(
                r["server_process_cpu_s"] for r in later), 4),
            "devices_cpu_s_per_round": round(sum(c.value for _, _, c in fleet) / rounds, 4),
            "server_page_faults_median": statistics.median(r["page_faults"] for r in later),
            "device_procs": procs, "max_payload": max_payload,
            # CPU time the hypervisor gave to other guests meanwhile: this machine's
            # two vCPUs are shared, and a round is CPU-bound
            "steal_share": steal_share(ticks, cpu_ticks()),
            "round_seconds": [r["cycle_s"] for r in later],
            "model_bytes": report["rounds"][-1]["downlink_bytes"] // devices}


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def to_markdown(res: dict) -> str:
    load = {k: [round(x, 2) for x in v] for k, v in res.get("load", {}).items()}
    out = ["# Field loop benchmark\n", f"Machine: {res['machine']}; load (1, 5, 15 min) "
           f"{load.get('start')} at the start, {load.get('end')} at the end. Command: "
           f"`{res['command']}`.\n"]
    if res["throughput"]:
        out += ["## Broker throughput (QoS 1, one publisher, one subscriber, frames above "
                "128 KB chunked as fedge sends them)\n",
                "| frame size | amqtt frames/s | amqtt MB/s | Mosquitto frames/s "
                "| Mosquitto MB/s |",
                "|---|---|---|---|---|"]
    for a, m in zip(res["throughput"].get("amqtt", []), res["throughput"].get("mosquitto", [])):
        fmt = lambda v: "failed" if v is None else v
        out.append(f"| {a['size'] // 1024} KB | {fmt(a['frames_per_s'])} | {fmt(a['mb_per_s'])} "
                   f"| {fmt(m['frames_per_s'])} | {fmt(m['mb_per_s'])} |")
    out += ["\n## Orchestration overhead per round (Mosquitto, devices answer at once)\n",
            "| devices | max payload (KiB) | device processes | median round cycle = overhead (s) "
            "| record's seconds (s) "
            "| per device (ms) "
            "| aggregator CPU "
            "per round (s) | server process CPU per round (s) | devices' CPU per round "
            "(s, one core) | model frame bytes | CPU stolen by the hypervisor |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["orchestration"]:
        out.append(f"| {r['devices']} | {r.get('max_payload', DEFAULT_MAX_PAYLOAD) // 1024} | "
                   f"{r.get('device_procs', 1)} | {r['overhead_s_median']} | "
                   f"{r.get('record_seconds_median', '-')} | "
                   f"{1e3 * r['overhead_s_median'] / r['devices']:.1f} | "
                   f"{r.get('aggregator_cpu_s_median', '-')} | "
                   f"{r.get('server_process_cpu_s_median', '-')} | "
                   f"{r.get('devices_cpu_s_per_round', '-')} | {r['model_bytes']:,} | "
                   f"{_pct(r.get('steal_share'))} |")
    out += ["", "The devices run apart from the aggregator, in as many processes as the "
            "table says (in the field each has its own CPU; here they share this machine's "
            "cores with the aggregator and the broker), answering every task at once with "
            "the model they got, signed. A round's cycle, from its start to the next "
            "round's, is then all overhead: the model and tasks published, fetched and "
            "checked, updates sent, checked, screened, folded and saved durably, the round "
            "closed and checkpointed (the round record's own seconds, beside it, stop "
            "before the checkpoint). Aggregator CPU "
            "is that thread's own time (the part that grows with the fleet), the server "
            "process's adds its network thread (receiving and reassembling chunks), the "
            "syncer and the downlink's; the devices' CPU is their processes' over all "
            "rounds, per round: work that in the field is spread over the devices' own "
            "CPUs."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--devices", default="4,16,64", help="fleet sizes for the orchestration "
                    "overhead")
    ap.add_argument("--device-procs", default="1", help="processes the echo devices are "
                    "spread over, e.g. 1,4: each layout measured for each fleet size")
    ap.add_argument("--max-payload", default=str(DEFAULT_MAX_PAYLOAD), help="bytes per "
                    "MQTT message, e.g. 131072,1048576 (the default, and what fedge secure "
                    "init's credentials carry): each measured for each layout")
    ap.add_argument("--no-throughput", action="store_true", help="only the orchestration "
                    "overhead (the broker throughput tables are left out)")
    ap.add_argument("--json", default="runs/bench_field.json")
    ap.add_argument("--md")
    args = ap.parse_args()
    res = {"machine": machine(), "command": command("bench/field.py"),
           "load": {"start": os.getloadavg()}, "throughput": {}, "orchestration": []}
    if not args.no_throughput:
        with EmbeddedBroker() as b:
            res["throughput"]["amqtt"] = run_throughput(b.url, args.repeats)
    with tempfile.TemporaryDirectory() as d:
        m = Mosquitto(Path(d)).start()
        try:
            if not args.no_throughput:
                res["throughput"]["mosquitto"] = run_throughput(m.url, args.repeats)
            for n in (int(v) for v in args.devices.split(",")):
                for size in (int(v) for v in args.max_payload.split(",")):
                    for procs in (int(v) for v in args.device_procs.split(",")):
                        res["orchestration"].append(orchestration(
                            m.url, n, args.rounds, min(procs, n), size))
        finally:
            m.stop()
    res["load"]["end"] = os.getloadavg()
    write_results(res, args.json, args.md, to_markdown)


if __name__ == "__main__":
    main()
