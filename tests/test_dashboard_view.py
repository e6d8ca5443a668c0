"""The dashboard's view takes only what the aggregator would: statuses signed by their
device's registered key and not replayed, summaries, plans and rollout reports signed
by the aggregator (the operator) for this job, and content of the shape the page
shows. Everything else is counted as refused and changes nothing. /metrics parses with
prometheus-client's parser."""
from __future__ import annotations

import dataclasses
import time

import pytest

pytest.importorskip("prometheus_client")

from broker_server.records import train_loss  # noqa: E402
from device_runtime import messages  # noqa: E402
from device_runtime.keys import RegistryFile, Signer  # noqa: E402
from tests.keys import KEYS  # noqa: E402
from toolkit.field.dashboard.metrics import registry_for, render  # noqa: E402
from toolkit.field.dashboard.view import FleetView  # noqa: E402
from toolkit.field.summary import history_row  # noqa: E402

JOB = "dash-view"


def _view() -> FleetView:
    KEYS.device("d0")
    return FleetView(JOB, KEYS.server.public, RegistryFile(None, KEYS.registry()))


def _status(state="online", ts=None, device="d0", key=None, **kw) -> bytes:
    st = messages.Status(device, state, "rpi4", 10, {"fedge": "0.1.0", "ort_provider":
                                                     "CPUExecutionProvider"},
                         ts=time.time() if ts is None else ts, **kw)
    return messages.seal(st, JOB, device, key or KEYS.device(device))


def _summary(round_=1, closed=None, signer=None, **kw) -> bytes:
    s = messages.Summary(round=round_, rounds=3, closed=closed or time.time(), seconds=1.5,
                         devices_assigned=2, devices_reporting=2, devices_online=2,
                         uplink_bytes=100, downlink_bytes=200, accuracy=0.5, loss=1.0,
                         reporting=["d0"], rejected_by_reason={"update: signature": 2},
                         profiles={"rpi4": {"devices": 1, "loss": 1.0, "accuracy": -1.0}},
                         cpu_seconds=3.0, rss_bytes=50_000_000, session="s")
    s = dataclasses.replace(s, **kw)
    return messages.seal(s, JOB, "server", signer or KEYS.server, round_, "s")


def _topic(what: str) -> str:
    return f"fedge/{JOB}/{what}"


def test_a_signed_status_is_shown_and_the_will_turns_it_offline():
    v = _view()
    v.take(_topic("devices/d0/status"), _status(ts=time.time()))
    v.take(_topic("devices/d0/status"), _status("offline", ts=0.0))  # the will: old ts
    _, out = v.changes(-1)
    [row] = out["devices"]
    assert (row["state"], row["profile"], row["fedge"]) == ("offline", "rpi4", "0.1.0")
    assert v.refused == {}


@pytest.mark.parametrize("case", ["unknown device", "wrong key", "replayed", "other device"])
def test_a_status_not_from_its_device_or_replayed_is_refused(case):
    v = _view()
    v.take(_topic("devices/d0/status"), _status(ts=100.0, error="first"))
    payload, topic = {
        "unknown device": (_status(device="ghost", key=Signer.generate()), "ghost"),
        "wrong key": (_status(ts=200.0, key=Signer.generate(), error="forged"), "d0"),
        "replayed": (_status(ts=50.0, error="old"), "d0"),
        "other device": (_status(ts=200.0, error="forged"), "d1"),
    }[case]
    v.take(_topic(f"devices/{topic}/status"), payload)
    _, out = v.changes(-1)
    assert [(r["device"], r["error"]) for r in out["devices"]] == [("d0", "first")]
    assert sum(v.refused.values()) == 1


def test_a_summary_draws_the_timeline_and_the_metrics():
    from prometheus_client.parser import text_string_to_metric_families

    v = _view()
    old = history_row({"round": 1, "accuracy": 0.4, "loss": 1.2, "devices_reporting": 2,
                       "devices_assigned": 2, "uplink_bytes": 90, "downlink_bytes": 180,
                       "seconds": 2.0, "rejected_so_far": 0}, time.time() - 5)
    v.take(_topic("summary"), _summary(2, history=[old]))
    _, out = v.changes(-1)
    assert [r[0] for r in out["timeline"]] == [1, 2]
    assert out["summary"]["accuracy"] == 0.5 and out["profiles"]["rpi4"][0][0] == 2
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for f in text_string_to_metric_families(render(registry_for(v)).decode())
         for s in f.samples}
    job = ("fedge_job", JOB)
    assert m[("fedge_rounds_total", (job,))] == 2
    assert m[("fedge_bytes_total", (("direction", "up"), job))] == 190
    assert m[("fedge_updates_rejected_total", (job, ("reason", "update: signature")))] == 2
    assert m[("fedge_round_duration_seconds_bucket", (job, ("le", "2.0")))] == 2
    assert m[("fedge_aggregator_resident_memory_bytes", (job,))] == 50_000_000


@pytest.mark.parametrize("case", ["not the aggregator", "older", "bad history",
                                  "negative count", "another job"])
def test_a_summary_not_signed_by_the_aggregator_or_malformed_is_refused(case):
    v = _view()
    now = time.time()
    v.take(_topic("summary"), _summary(1, closed=now))
    payload = {
        "not the aggregator": _summary(2, closed=now + 1, signer=Signer.generate()),
        "older": _summary(2, closed=now - 10),
        "bad history": _summary(2, closed=now + 1, history=[["x"]]),
        "negative count": _summary(2, closed=now + 1, uplink_bytes=-5),
        "another job": messages.seal(messages.Summary(2, 3, now + 1, 1.0, 1, 1, 1, 1, 1),
                                     "other", "server", KEYS.server, 2, "s"),
    }[case]
    v.take(_topic("summary"), payload)
    _, out = v.changes(-1)
    assert out["summary"]["round"] == 1 and [r[0] for r in out["timeline"]] == [1]
    assert sum(v.refused.values()) == 1


def _rollout(stage="canary", updated=None, signer=None, version=2, nonce="r1", **kw) -> bytes:
    r = messages.RolloutReport(
        rollout="r1", version=2, stage=stage, canary=["d0"], rest=["d1"],
        previous={"d0": 1, "d1": 1}, devices={"d0": {
            "action": "install", "ok": True, "artifact_version": 2, "latency_ms": 0.2,
            "previous_latency_ms": 0.1, "error": ""}}, hold_from=10.0, hold=600.0,
        history=[[5.0, "canary", "1 of 2 devices"]],
        updated=time.time() if updated is None else updated)
    r = dataclasses.replace(r, **kw)
    return messages.seal(r, JOB, "server", signer or KEYS.server, version, nonce)


def test_a_rollout_report_is_shown_with_each_devices_result():
    v = _view()
    v.take(_topic("rollouts"), _rollout())
    _, out = v.changes(-1)
    r = out["rollout"]
    assert (r["stage"], r["version"], r["canary"], r["rest"]) == ("canary", 2, ["d0"], ["d1"])
    assert r["devices"]["d0"]["ok"] and r["devices"]["d0"]["artifact_version"] == 2
    assert v.refused == {}


@pytest.mark.parametrize("case", ["not the operator", "older", "unknown stage", "bad report",
                                  "round is not the version", "nonce is not the id"])
def test_a_rollout_report_not_signed_by_the_operator_or_malformed_is_refused(case):
    v = _view()
    now = time.time()
    v.take(_topic("rollouts"), _rollout(updated=now))
    bad_device = {"d0": {"action": "rm -rf", "ok": True}}
    payload = {
        "not the operator": _rollout("done", now + 1, signer=Signer.generate()),
        "older": _rollout("done", now - 10),
        "unknown stage": _rollout("<script>", now + 1),
        "bad report": _rollout("done", now + 1, devices=bad_device),
        "round is not the version": _rollout("done", now + 1, version=3),
        "nonce is not the id": _rollout("done", now + 1, nonce="r0"),
    }[case]
    v.take(_topic("rollouts"), payload)
    _, out = v.changes(-1)
    assert out["rollout"]["stage"] == "canary"
    assert sum(v.refused.values()) == 1


def test_train_loss_weighs_by_samples_and_ignores_what_is_not_a_number():
    got = train_loss({"a": {"loss": 1.0, "samples": 30}, "b": {"loss": 2.0, "samples": 10},
                      "c": {"loss": "nan?", "samples": 10}, "d": {"samples": 5}})
    assert got == {"loss": 1.25, "device_loss": {"a": 1.0, "b": 2.0}}


def test_dashboard_bad_arguments_are_one_line(tmp_path):
    from tests.conftest import assert_one_line_error, run_fedge

    pub = tmp_path / "server.pub"
    pub.write_bytes(KEYS.server.public.pem())
    base = ["dashboard", "--broker", "mqtt://127.0.0.1:1"]
    code, _, err = run_fedge(*base, "--job", "a/b", "--trust", str(pub))
    assert_one_line_error(code, err, 2, "job id")
    code, _, err = run_fedge(*base, "--job", "j", "--registry", str(pub))
    assert_one_line_error(code, err, 2, "--trust: expected the aggregator's public key")
    code, _, err = run_fedge(*base, "--job", "j", "--trust", str(pub))
    assert_one_line_error(code, err, 2, "--registry: expected the fleet's device keys")
    code, _, err = run_fedge(*base, "--job", "j", "--port", "70000", "--trust", str(pub))
    assert_one_line_error(code, err, 2, "--port: expected 0-65535, got 70000")
