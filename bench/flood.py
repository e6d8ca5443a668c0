"""A hostile client floods the broker while an honest 4-device job runs: does every
round complete, and how much memory does the aggregator need for it?

Three runs side by side, each a real `fedge serve` and 4 `fedge device` processes on
a real Mosquitto (configured as `fedge secure init` sizes it: a message size limit
from the job's largest frame, which chunking bounds to ``--max-payload``):

- ``none``: the honest job alone (the baseline);
- ``chunks``: for ``--seconds``, chunk frames (well formed, unsigned or signed by a
  stranger, unique ids) at the rate the client can publish, on the devices' update
  topics;
- ``giant``: 8 messages of 100 MiB on the update topics.

For each: rounds completed, the job's wall time, the aggregator's peak RSS (VmHWM),
and what it refused. JSON always; ``--md`` writes the table.

    python bench/flood.py --json docs/results/flood.json --md docs/results/flood.md
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import command, machine, write_results  # noqa: E402
from device_runtime import wire  # noqa: E402
from device_runtime.keys import Signer  # noqa: E402
from device_runtime.topics import Topics  # noqa: E402
from testkit.brokers import Mosquitto  # noqa: E402
from testkit.field import finish, prepare_job, start_device, start_server  # noqa: E402

DEVICES = 4
MAX_PAYLOAD = 128 * 1024
GIANT = 100 << 20


def _peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _chunk(job: str, device: str, rng, stranger: Signer | None) -> bytes:
    return wire.encode(wire.Frame("chunk", job, 1, device, "fp32",
                                  {"data": rng.integers(0, 255, 1, dtype=np.uint8)},
                                  chunk={"id": secrets.token_hex(8), "index": 0, "count": 2,
                                         "sha256": "0" * 64}), signer=stranger)


def _flood(url: str, job: str, mode: str, seconds: float, stop: threading.Event,
           sent: list) -> None:
    import paho.mqtt.client as mqtt

    port = int(url.rsplit(":", 1)[1])
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hostile")
    c.connect("127.0.0.1", port)
    c.loop_start()
    topics, rng, stranger = Topics(job), np.random.default_rng(0), Signer.generate()
    t0 = time.time()
    try:
        if mode == "chunks":
            while time.time() - t0 < seconds and not stop.is_set():
                for k in range(DEVICES):
                    payload = _chunk(job, f"dev-{k}", rng, stranger if k % 2 else None)
                    topic = f"{topics.update(1 + len(sent) % 5, f'dev-{k}')}/_c/0"
                    c.publish(topic, payload, qos=0)
                    sent.append(len(payload))
                time.sleep(0)  # let paho's thread write
        elif mode == "giant":
            blob = bytes(GIANT)
            for i in range(8):
                c.publish(topics.update(1, f"dev-{i % DEVICES}"), blob, qos=1).wait_for_publish()
                sent.append(GIANT)
    finally:
        c.loop_stop()
        c.disconnect()


def run_one(mode: str, seconds: float, rounds: int, work: Path) -> dict:
    ckpt = prepare_job(work, DEVICES)
    limit = MAX_PAYLOAD + 64 * 1024  # the largest frame is a chunk: what secure init sizes
    broker = Mosquitto(work / "mosq", extra_conf=f"message_size_limit {limit}\n").start()
    job = f"flood-{mode}"
    try:
        devices = [start_device(broker.url, job, work, k) for k in range(DEVICES)]
        server = start_server(broker.url, job, work, ckpt, rounds, DEVICES, 120.0)
        stop, sent, peak, t0 = threading.Event(), [], 0, time.time()
        hostile = threading.Thread(target=_flood, args=(broker.url, job, mode, seconds, stop,
                                                        sent), daemon=True)
        started = False
        while server.poll() is None:
            peak = max(peak, _peak_rss(server.pid))
            if not started and time.time() - t0 > 5:
                hostile.start()  # once the job is under way
                started = True
            time.sleep(0.2)
        stop.set()
        codes = finish([server, *devices], timeout=120)
    finally:
        broker.stop()
    report = json.loads((work / "report.json").read_text()) if (work / "report.json").exists() \
        else {"rounds": [], "rejected_total": None, "rejected_by_reason": {}}
    return {"mode": mode, "exit_codes": codes, "rounds_completed": len(report["rounds"]),
            "devices_reporting": [r["devices_reporting"] for r in report["rounds"]],
            "seconds": round(time.time() - t0, 1), "aggregator_peak_rss": peak,
            "hostile_messages": len(sent), "hostile_bytes": sum(sent),
            "rejected_total": report.get("rejected_total"),
            "rejected_by_reason": report.get("rejected_by_reason", {}),
            "final_accuracy": report.get("final_accuracy")}


def run(seconds: float, rounds: int, modes: list[str]) -> dict:
    out = []
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix=f"fedge-flood-{mode}-") as work:
            out.append(run_one(mode, seconds, rounds, Path(work)))
        print(json.dumps(out[-1])[:400], flush=True)
    base = next((r["aggregator_peak_rss"] for r in out if r["mode"] == "none"), None)
    for r in out:
        r["peak_rss_over_baseline"] = None if base is None else r["aggregator_peak_rss"] - base
    return {"machine": machine(), "load": os.getloadavg(), "command": command("bench/flood.py"),
            "devices": DEVICES, "rounds": rounds, "flood_seconds": seconds, "runs": out}


HEAD = ("| flood | sent | rounds (devices reporting) | job s | aggregator peak RSS MiB | "
        "vs none | refused | accuracy |")


def to_markdown(r: dict) -> str:
    rows = "\n".join(
        f"| {x['mode']} | {x['hostile_messages']:,} msgs, {x['hostile_bytes'] / 2**20:,.1f} MiB"
        f" | {x['rounds_completed']}/{r['rounds']} ({', '.join(map(str, x['devices_reporting']))})"
        f" | {x['seconds']} | {x['aggregator_peak_rss'] / 2**20:,.1f} | "
        f"{(x['peak_rss_over_baseline'] or 0) / 2**20:+,.1f} | {x['rejected_total']} | "
        f"{x['final_accuracy']} |" for x in r["runs"])
    return f"""# A hostile client floods the broker during an honest job

`{r['command']}` on {r['machine']}, load average {', '.join(f'{x:.1f}' for x in r['load'])}.
{r['devices']} `fedge device` processes and `fedge serve` on a real Mosquitto
(`message_size_limit` 192 KiB: chunking bounds every fedge message to `--max-payload`
128 KiB); the hostile client is another client of the same broker.

{HEAD}
|---|---|---|---|---|---|---|---|
{rows}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--modes", default="none,chunks,giant")
    p.add_argument("--json", default="runs/flood.json")
    p.add_argument("--md")
    a = p.parse_args()
    write_results(run(a.seconds, a.rounds, a.modes.split(",")), a.json, a.md, to_markdown)


if __name__ == "__main__":
    main()
