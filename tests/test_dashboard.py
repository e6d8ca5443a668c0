"""``fedge dashboard`` end to end: a real Mosquitto, ``fedge serve``, four ``fedge device``
processes and a fifth whose export is forged, the dashboard process, and a real headless
Chromium reading the page. The fleet table shows the four online and the forged one's
refusal; a device killed with SIGKILL turns offline within the broker's keep-alive; the
round timeline gains a point per round, each shown under a second after the round
closed; ``/metrics`` parses with prometheus-client's parser and agrees with the report;
a rollout's signed report becomes the rollout panel.
Screenshots go to docs/results/dashboard/."""
from __future__ import annotations

import json
import secrets
import time

import pytest

from broker_server.embedded import free_port
from testkit import ROOT
from testkit.browser import (
    chromium_paths,
    get,
    headless_chromium,
    page_value,
    row_cells,
    start_dashboard,
    wait_http,
)
from testkit.field import finish, prepare_job, sigkill, start_device, start_server, wait_for
from testkit.timing import scaled

pytestmark = pytest.mark.slow  # real processes, a real broker and a real browser

SHOTS = ROOT / "docs" / "results" / "dashboard"
KEEPALIVE = 15  # MqttTransport's default: the broker sends the will after 1.5 x this
ROUNDS = 4


def _forged_export(work):
    """A manifest whose signature is not the aggregator's: the device refuses it."""
    m = work / "forged" / "manifest.json"
    m.parent.mkdir()
    m.write_text(json.dumps({"format": 1, "job": "x", "version": 1, "devices": {}}))
    (m.parent / "manifest.json.sig").write_bytes(b"\0" * 64)
    return m


def _metrics(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(get(url)):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items()
                                      if k != "fedge_job")))] = s.value
    return out


@pytest.fixture
def browser():
    if chromium_paths() is None:
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    pytest.importorskip("selenium")
    driver = headless_chromium()
    yield driver
    driver.quit()


def test_dashboard_shows_the_fleet_the_rounds_and_the_metrics(tmp_path, mosquitto, browser):
    work, job = tmp_path, f"dash-{secrets.token_hex(3)}"
    ckpt = prepare_job(work, devices=5)
    port = free_port()
    page = f"http://127.0.0.1:{port}"
    dash = start_dashboard(mosquitto.url, job, work, port)
    devices = [start_device(mosquitto.url, job, work, k) for k in range(4)]
    forged = start_device(mosquitto.url, job, work, 4, extra=[
        "--manifest", str(_forged_export(work)), *_keys(work, 4)])
    procs = [dash, *devices, forged]
    try:
        wait_http(page + "/api/state")
        browser.get(page)
        SHOTS.mkdir(parents=True, exist_ok=True)
        wait_for(lambda: _states(browser, 4) == ["online"] * 4, 60, "4 devices online")
        wait_for(lambda: (row_cells(browser, "dev-4") or [""] * 9)[7].startswith("error"),
                 60, "the forged device's refusal")
        assert "refused" in row_cells(browser, "dev-4")[8]
        # Killed before the job starts, so that no round waits out its deadline for it.
        killed = time.time()
        sigkill(devices[3])
        wait_for(lambda: _states(browser, 4)[3] == "offline", KEEPALIVE * 1.5 + 5,
                 "the killed device to turn offline")
        offline_after = time.time() - killed
        server = start_server(mosquitto.url, job, work, ckpt, rounds=ROUNDS, min_devices=3,
                              round_timeout=scaled(30.0))
        procs.append(server)
        wait_for(lambda: page_value(browser, "fedge.rounds.length") >= 1, 120, "round 1")
        _forge_status(mosquitto.url, job)  # refused by the aggregator and the dashboard
        assert server.wait(scaled(120)) == 0
        wait_for(lambda: page_value(browser, "fedge.rounds.length") == ROUNDS, 10,
                 "the last round on the page")
        browser.save_screenshot(str(SHOTS / "rounds.png"))
        browser.find_element("id", "fleet").screenshot(str(SHOTS / "fleet.png"))
        report = json.loads((work / "report.json").read_text())
        _check_page(browser, report)
        _check_metrics(_metrics(page + "/metrics"), report)
        _check_rollout(browser, mosquitto.url, job, work)
        print(f"offline {offline_after:.1f} s after SIGKILL; latency "
              f"{page_value(browser, 'fedge.latency')}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        finish(procs, 10)


def _forge_status(url: str, job: str) -> None:
    """dev-0's status signed by a key not in the registry (not retained: dev-0's stays)."""
    from device_runtime import messages
    from device_runtime.keys import Signer
    from device_runtime.transport.mqtt import MqttTransport

    t = MqttTransport(url, "forger")
    t.connect()
    forged = messages.Status("dev-0", "error", "rpi4", 1, error="forged", ts=time.time())
    t.publish(f"fedge/{job}/devices/dev-0/status",
              messages.seal(forged, job, "dev-0", Signer.generate()))
    t.close()


def _check_rollout(browser, url: str, job: str, work) -> None:
    """fedge rollout's signed report, as the driver publishes it, becomes the rollout
    panel: stage, reason, a row per device with its result and error."""
    from device_runtime import messages
    from device_runtime.keys import Signer
    from device_runtime.transport.mqtt import MqttTransport

    report = messages.RolloutReport(
        rollout="r-shot", version=2, stage="rolled-back", reason="canary error rate 50% > 0%",
        canary=["dev-0", "dev-1"], rest=["dev-2"], previous={"dev-0": 1, "dev-1": 1,
                                                             "dev-2": 1},
        devices={"dev-0": {"action": "rollback", "ok": True, "artifact_version": 1,
                           "latency_ms": None, "previous_latency_ms": None, "error": ""},
                 "dev-1": {"action": "rollback", "ok": False, "artifact_version": 1,
                           "latency_ms": None, "previous_latency_ms": None,
                           "error": "<b>cannot load</b> v2"}},
        history=[[time.time() - 3, "canary", "2 of 3 devices"],
                 [time.time() - 1, "rolling-back", "canary error rate 50% > 0%"],
                 [time.time(), "rolled-back", "canary error rate 50% > 0%"]],
        updated=time.time())
    t = MqttTransport(url, "operator")
    t.connect()
    t.publish(f"fedge/{job}/rollouts", messages.seal(
        report, job, "server", Signer.load(work / "keys" / "server.key"), 2, "r-shot"),
        retain=True)
    t.close()
    wait_for(lambda: page_value(browser, "fedge.rollout ? fedge.rollout.stage : ''")
             == "rolled-back", 10, "the rollout panel")
    rows = page_value(browser, "[...document.querySelectorAll('#rollout-devices tbody tr')]"
                               ".map(tr => [...tr.cells].map(td => td.textContent))")
    assert [r[:6] for r in rows] == [["canary", "dev-0", "v1", "v1", "rollback", "ok"],
                                     ["canary", "dev-1", "v1", "v1", "rollback", "failed"],
                                     ["rest", "dev-2", "v1", "-", "-", "waiting"]], rows
    assert rows[1][7] == "<b>cannot load</b> v2"  # shown as text, never as HTML
    stage = page_value(browser, "document.getElementById('rollout-stage').textContent")
    assert stage.startswith("rolled-back: canary error rate 50%"), stage
    panel = browser.find_element("id", "rollout")
    browser.execute_script("arguments[0].scrollIntoView()", panel)
    panel.screenshot(str(SHOTS / "rollout.png"))


def _keys(work, k: int) -> list[str]:
    return ["--key", str(work / "keys" / f"dev-{k}.key"),
            "--trust", str(work / "keys" / "server.pub")]


def _states(browser, n: int) -> list[str]:
    return [(row_cells(browser, f"dev-{k}") or [""] * 9)[2] for k in range(n)]


def _check_page(browser, report: dict) -> None:
    """A point per round, in order, each drawn under a second after its round closed."""
    assert page_value(browser, "fedge.rounds") == list(range(1, ROUNDS + 1))
    latency = page_value(browser, "fedge.latency")
    assert [x["round"] for x in latency] == list(range(1, ROUNDS + 1))
    assert all(x["seconds"] < 1.0 for x in latency), latency
    reasons = page_value(browser, "[...document.querySelectorAll('#reasons td')]"
                                  ".map(td => td.textContent)")
    assert len(reasons) == 2 and "refused" in reasons[0] and reasons[1] == "1", reasons
    assert row_cells(browser, "dev-0")[7].startswith("online"), "the forgery is not shown"
    shown = page_value(browser, "document.getElementById('accuracy').textContent")
    assert float(shown) == pytest.approx(report["final_accuracy"], abs=1e-4)


def _check_metrics(m: dict, report: dict) -> None:
    rounds = report["rounds"]
    assert m[("fedge_rounds_total", ())] == ROUNDS
    assert m[("fedge_accuracy", ())] == pytest.approx(report["final_accuracy"])
    assert m[("fedge_updates_accepted_total", ())] == sum(r["devices_reporting"]
                                                          for r in rounds)
    assert m[("fedge_bytes_total", (("direction", "up"),))] == report["uplink_bytes_total"]
    assert m[("fedge_bytes_total", (("direction", "down"),))] == \
        report["downlink_bytes_total"]
    assert m[("fedge_round_duration_seconds_count", ())] == ROUNDS
    assert m[("fedge_devices", (("state", "offline"),))] == 1
    assert m[("fedge_devices", (("state", "error"),))] == 1
    assert m[("fedge_aggregator_resident_memory_bytes", ())] > 10e6
    assert m[("fedge_aggregator_cpu_seconds_total", ())] > 0
    assert m[("fedge_devices_reporting", ())] == rounds[-1]["devices_reporting"]
    # the forged status: refused by the aggregator (its summary) and by the dashboard
    # (the aggregator's transport gate names it "chunk: refused", as any gate refusal)
    assert sum(v for (name, _), v in m.items() if name == "fedge_updates_rejected_total") == 1
    assert sum(v for (name, _), v in m.items() if name == "fedge_dashboard_refused_total") == 1
