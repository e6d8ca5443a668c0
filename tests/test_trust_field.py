"""Issue 20's attacks on the wire, against real `fedge serve` and `fedge device` processes
on a real Mosquitto without an ACL (anyone may publish anything): before messages were
signed, each of these made devices run code, stop for good, or take a forged update."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from device_runtime import messages, wire
from device_runtime.keys import PublicKey, Signer
from device_runtime.topics import Topics
from device_runtime.transport.mqtt import MqttTransport
from testkit.field import finish, prepare_job, start_device, start_server
from testkit.timing import scaled

pytestmark = pytest.mark.slow  # real fedge processes against a real broker, end to end

JOB = "attacked"


class Attacker:
    """A client of the same broker: forges the aggregator's messages and replays a
    device's update into the next round."""

    def __init__(self, url: str, marker_dir: str, server_key_id: str):
        self.server_key_id = server_key_id
        self.topics, self.lock = Topics(JOB), threading.Lock()
        self.t = MqttTransport(url, "attacker", max_payload=1 << 20)
        self.t.connect()
        self.stranger = Signer.generate()  # a key nobody trusts
        self.recorded: bytes | None = None
        self.replayed = 0
        # The remote-code model config that ran a planted hubconf.py in every device.
        self.custom = {"arch": "custom", "input_shape": [40], "num_classes": 10,
                       "factory": "torch.hub:load",
                       "kwargs": {"repo_or_dir": marker_dir, "model": "model",
                                  "source": "local"}}

    def before_the_job(self) -> None:
        stop = json.dumps({"action": "stop", "reason": "forged"}).encode()
        self.t.publish(self.topics.control, stop, retain=True)
        plan = messages.Plan(JOB, "fedavg", "fp32", 3, self.custom, 1, 30.0)
        self.t.publish(self.topics.plan, messages.dump(plan), retain=True)

    def during_the_job(self) -> None:
        self.t.subscribe(self.topics.task("+", "+"), self._on_task)
        self.t.subscribe(self.topics.update("+", "dev-0"), self._on_update)

    def _on_task(self, topic: str, payload: bytes) -> None:
        if payload[:4] != wire.MAGIC or \
                wire.peek_header(payload).get("auth", {}).get("key") != self.server_key_id:
            return  # not one the aggregator sent (ours, for one)
        where = self.topics.parse(topic)
        r, device = where["round"], where["device"]
        forged = messages.Task(round=r, device=device, variant="full", model_sha256="0" * 64,
                               deadline=4e9, epochs=1, batch_size=8, lr=0.1, seed=0,
                               codec="fp32", model=self.custom, nonce="forged")
        for sealed in (messages.dump(forged), messages.seal(forged, JOB, "server",
                                                            self.stranger, r, "forged",
                                                            device)):
            self.t.publish(self.topics.task(r, device), sealed)
        self.t.publish(self.topics.control, messages.seal(
            messages.Control("stop", "forged"), JOB, "server", self.stranger), retain=True)
        with self.lock:
            if r == 2 and device == "dev-0" and self.recorded and not self.replayed:
                head = wire.peek_header(self.recorded)
                h = len(json.dumps(head, separators=(",", ":")))
                header = self.recorded[8:8 + h].replace(b'"round":1,', b'"round":2,')
                self.t.publish(self.topics.update(2, "dev-0"),
                               self.recorded[:8] + header + self.recorded[8 + h:])
                self.replayed += 1

    def _on_update(self, topic: str, payload: bytes) -> None:
        with self.lock:
            if self.topics.parse(topic)["round"] == 1 and self.recorded is None:
                self.recorded = payload


def test_forged_stops_plans_tasks_and_a_replayed_update_change_nothing(mosquitto, tmp_path):
    marker = tmp_path / "hub" / "ran"
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "hubconf.py").write_text(
        f"open({str(marker)!r}, 'w').write('remote code ran')\n"
        "def model(**kw):\n    raise SystemExit('remote code ran')\n")
    ckpt = prepare_job(tmp_path, 3)
    server_key = PublicKey.load(tmp_path / "keys" / "server.pub")
    attacker = Attacker(mosquitto.url, str(tmp_path / "hub"), server_key.key_id)
    attacker.before_the_job()
    devices = [start_device(mosquitto.url, JOB, tmp_path, k) for k in range(3)]
    attacker.during_the_job()
    server = start_server(mosquitto.url, JOB, tmp_path, ckpt, rounds=3, min_devices=3,
                          round_timeout=scaled(60))
    codes = finish([server, *devices], timeout=600)
    attacker.t.close()
    logs = "".join((tmp_path / f"device-{k}.log").read_text() for k in range(3))
    server_log = (tmp_path / "server.log").read_text()
    assert codes == [0, 0, 0, 0], (codes, server_log[-2000:], logs[-3000:])
    report = json.loads((tmp_path / "report.json").read_text())
    # Every device took part in every round: none stopped, none ran the forged task.
    assert [r["devices_reporting"] for r in report["rounds"]] == [3, 3, 3]
    assert not marker.exists()
    assert "refused control #1" in logs and "refused plan #1" in logs
    assert "frame magic" in logs and "signed by another key" in logs
    # The recorded round-1 update, re-wrapped as round 2: refused, dev-0's own taken.
    assert attacker.replayed == 1
    refused = [r for r in report["rejected"] if r.get("round") == 2 or "chunk" in r["kind"]]
    assert any("signature" in r["reason"] or "signed frame" in r["reason"] for r in refused), \
        report["rejected"]
    assert "dev-0" in report["rounds"][1]["accepted"]
    final = np.asarray([r["accuracy"] for r in report["rounds"]])
    assert np.isfinite(final).all()
