"""``fedge audit`` against a live signed job: real `fedge serve` and three `fedge device`
processes on a real Mosquitto with no ACL, no size limit and no identity binding. The
signatures refuse the forged stop, task and plan and the flood; the plain broker passes
the giant message and the client-id takeover, and the audit must say so (exit 1)."""
from __future__ import annotations

import json
import time

import pytest

from broker_server.state import read_history
from device_runtime.topics import Topics
from device_runtime.transport.mqtt import MqttTransport
from tests.conftest import assert_one_line_error, run_fedge
from testkit.field import (
    completed_rounds,
    finish,
    prepare_job,
    start_device,
    start_server,
    wait_for,
)
from testkit.timing import scaled

pytestmark = pytest.mark.slow  # real fedge processes against a real broker, end to end

JOB = "audited"
ROUNDS = 1000  # more than any machine finishes during the audit: stopped after it


def retained(url: str) -> dict[str, bytes]:
    """What the broker holds retained on the job's plan and control topics."""
    got: dict[str, bytes] = {}
    t = MqttTransport(url, f"retained-{time.time_ns()}")
    t.connect()
    for topic in (Topics(JOB).plan, Topics(JOB).control):
        t.subscribe(topic, lambda topic, payload: got.__setitem__(topic, payload))
    time.sleep(scaled(1.5))
    t.close()
    return got


def test_audit_reports_what_a_plain_broker_lets_through(mosquitto, tmp_path):
    ckpt = prepare_job(tmp_path, 3)
    devices = [start_device(mosquitto.url, JOB, tmp_path, k) for k in range(3)]
    server = start_server(mosquitto.url, JOB, tmp_path, ckpt, rounds=ROUNDS, min_devices=3,
                          round_timeout=scaled(60))
    try:
        wait_for(lambda: completed_rounds(tmp_path) >= 1, 300, "round 1", step=0.2)
        before = retained(mosquitto.url)
        code, out, err = run_fedge("audit", "--broker", mosquitto.url, "--job", JOB,
                                   "--seconds", f"{scaled(2.0):.1f}", "--giant-mib", "16",
                                   "--json", str(tmp_path / "audit.json"))
        done_by_audit_end = completed_rounds(tmp_path)
        after = retained(mosquitto.url)
        # The job goes on after the audit, with every device.
        wait_for(lambda: completed_rounds(tmp_path) >= done_by_audit_end + 2, 300,
                 "two rounds after the audit", step=0.2)
    finally:
        for p in (server, *devices):
            p.kill()
        finish([server, *devices])
    logs = "".join((tmp_path / f"device-{k}.log").read_text() for k in range(3))
    server_log = (tmp_path / "server.log").read_text()
    audit = json.loads((tmp_path / "audit.json").read_text())
    verdicts = {a["attack"]: a["verdict"] for a in audit["attacks"]}
    assert verdicts == {"forged-stop": "refused", "forged-task": "refused",
                        "forged-plan": "refused", "chunk-flood": "held",
                        "giant-message": "NOT REFUSED", "client-id": "NOT REFUSED"}, out + err
    assert code == 1 and audit["refused"] is False, (code, out, err)
    assert "set message_size_limit" in out and "does not bind client ids" in out, out
    assert len(out.strip().splitlines()) == 2 + len(verdicts), out
    # The genuine retained plan is back, byte for byte; no forged stop was left behind.
    assert Topics(JOB).plan in before and after == before, (before.keys(), after.keys())
    # Every round, during the audit and after it, had every device.
    history = read_history(tmp_path / "state")[0]
    assert len(history) >= done_by_audit_end + 2, server_log[-2000:]
    assert all(r["devices_reporting"] == 3 for r in history), (history, logs[-3000:])
    assert "refused control" in logs and "refused plan" in logs and "refused task" in logs


def test_audit_of_a_job_that_is_not_there_is_one_line(mosquitto):
    code, _, err = run_fedge("audit", "--broker", mosquitto.url, "--job", "nosuchjob",
                             "--seconds", "1")
    assert_one_line_error(code, err, 2, "nosuchjob", "is the job live")
    code, _, err = run_fedge("audit", "--broker", mosquitto.url, "--job", "j",
                             "--seconds", "-1")
    assert_one_line_error(code, err, 2, "--seconds", "-1")


def test_audit_as_a_leaked_device_under_the_acl(tmp_path):
    """With a device's credentials on `fedge secure init`'s TLS listener and ACL, the
    audit reads no status and no update topic: it judges by progress alone, and says
    the giant message was not observed rather than refused."""
    from broker_server.embedded import free_port
    from testkit.brokers import Mosquitto

    port, agg_port, sec = free_port(), free_port(), tmp_path / "sec"
    code, _, err = run_fedge("secure", "init", "--devices", "dev-0", "dev-1", "dev-2",
                             "--out", str(sec), "--port", str(port), "--aggregator-port",
                             str(agg_port))
    assert code == 0, err
    broker = Mosquitto(tmp_path / "mosq", port=port, config=sec / "mosquitto.conf").start()
    url, creds = f"mqtts://localhost:{port}", sec / "credentials"
    ckpt = prepare_job(tmp_path, 3)
    procs = [start_server(f"mqtts://localhost:{agg_port}", JOB, tmp_path, ckpt, rounds=ROUNDS,
                          min_devices=3, round_timeout=scaled(60),
                          extra=["--credentials", str(creds / "aggregator.json")])]
    procs += [start_device(url, JOB, tmp_path, k, extra=[
        "--credentials", str(creds / f"dev-{k}.json")]) for k in range(3)]
    try:
        wait_for(lambda: completed_rounds(tmp_path) >= 1, 300, "round 1", step=0.2)
        code, out, err = run_fedge("audit", "--broker", url, "--job", JOB, "--credentials",
                                   str(creds / "dev-2.json"),
                                   # judged by progress alone: a loaded machine needs longer
                                   "--seconds", f"{scaled(1.0):.1f}",
                                   "--json", str(tmp_path / "audit.json"))
    finally:
        for p in procs:
            p.kill()
        finish(procs)
        broker.stop()
    assert (tmp_path / "audit.json").exists(), (code, out + err)
    audit = json.loads((tmp_path / "audit.json").read_text())
    verdicts = {a["attack"]: a["verdict"] for a in audit["attacks"]}
    assert verdicts == {"forged-stop": "refused", "forged-task": "refused",
                        "forged-plan": "refused", "chunk-flood": "held",
                        "giant-message": "not observed", "client-id": "NOT REFUSED"}, out + err
    assert "judged by progress alone" in out and "dev-2 connected as" in out, out
    assert code == 1, (code, out, err)
