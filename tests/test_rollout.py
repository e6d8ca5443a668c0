"""Staged rollout over a real Mosquitto with real `fedge device` processes: a new
export goes to a 25% canary of 8 devices and then to all; a broken one (it passes
its sha256 but does not load) stops at the canary, which rolls back, and every
device still runs a model that loads and predicts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testkit import ROOT
from testkit.field import fleet_keys, start_device, wait_for
from testkit.releases import tiny_release
from testkit.timing import scaled

pytestmark = pytest.mark.slow
DEVICES = 8
PROFILES = ("rpi4", "rpi5")


def _fleet(work: Path, url: str, job: str, devices: int = DEVICES):
    keys = fleet_keys(work, devices)
    v1 = tiny_release(work / "v1", job, 1, keys.server_key, PROFILES, seed=1)
    (work / "data").mkdir()
    procs = []
    for k in range(devices):
        rng = np.random.default_rng(k)
        np.savez(work / "data" / f"device-{k}.npz", x=rng.normal(size=(16, 40)).astype(
            np.float32), y=rng.integers(0, 10, 16))
        procs.append(start_device(url, job, work, k, PROFILES[k % 2], extra=[
            "--manifest", str(v1), "--models-dir", str(work / "models" / f"dev-{k}")],
            env={"FEDGE_HOME": str(work / f"home-{k}")}))
    wait_for(lambda: all((work / "models" / f"dev-{k}" / "current").is_symlink()
                         for k in range(devices)), 120, "every device running version 1")
    return keys, procs


def _command(work: Path, url: str, job: str, manifest: Path, keys, hold: str,
             *extra: str) -> list[str]:
    # --max-payload 1024 (unless extra says): every artifact frame travels as chunks.
    return [sys.executable, "-m", "toolkit", "rollout", "--manifest", str(manifest), "--job",
            job, "--broker", url, "--canary", "25%", "--hold", hold, "--fleet-wait",
            f"{scaled(6):g}s", "--report-timeout", f"{scaled(60):g}s", "--state",
            str(work / "rollout.json"), "--signing-key", str(keys.server_key),
            "--registry", str(keys.registry), "--max-payload", "1024", *extra]


def _state(work: Path) -> dict:
    try:
        return json.loads((work / "rollout.json").read_text())
    except (OSError, ValueError):
        return {}


def _rollout(work: Path, url: str, job: str, manifest: Path, keys, hold: str = "2s",
             *extra: str):
    p = subprocess.run(_command(work, url, job, manifest, keys, hold, *extra),
                       capture_output=True,
                       text=True, cwd=ROOT, timeout=scaled(300), env=_env())
    return p.returncode, p.stdout + p.stderr, _state(work)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _stop(procs) -> None:
    for p in procs:
        p.kill()
        p.wait()


def _runs(work: Path, k: int) -> int:
    return int(os.readlink(work / "models" / f"dev-{k}" / "current")[1:])


def _watched(url: str, job: str, keys) -> dict:
    """The rollout as a watcher sees it: the retained signed report, through the
    dashboard's view (which checks it against the operator's key)."""
    from device_runtime.keys import PublicKey, RegistryFile
    from device_runtime.transport.mqtt import MqttTransport
    from toolkit.field.dashboard.view import FleetView

    view = FleetView(job, PublicKey.load(keys.server_pub), RegistryFile(keys.registry))
    t = MqttTransport(url, f"watcher-{job}")
    t.connect()
    try:
        t.subscribe(view.topics.rollouts, view.take)
        wait_for(lambda: view.changes(0)[1].get("rollout", {}).get("stage") in
                 ("done", "rolled-back"), 30, "the rollout's final report")
    finally:
        t.close()
    assert view.refused == {}
    return view.changes(0)[1]["rollout"]


def test_canary_then_everyone(tmp_path, mosquitto):
    job = "roll-1"
    keys, procs = _fleet(tmp_path, mosquitto.url, job)
    try:
        v2 = tiny_release(tmp_path / "v2", job, 2, keys.server_key, PROFILES, seed=2)
        # Killed during a long hold, once the canary has it; restarted, it resumes.
        first = subprocess.Popen(_command(tmp_path, mosquitto.url, job, v2, keys, "10m"),
                                 cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        wait_for(lambda: _state(tmp_path).get("hold_from"), 180, "the canary's reports")
        first.kill()
        first.wait()
        before = _state(tmp_path)
        assert all(before["devices"][d]["ok"] for d in before["canary"]), before
        code, out, st = _rollout(tmp_path, mosquitto.url, job, v2, keys)
        assert code == 0, out
        assert st["rollout"] == before["rollout"] and st["canary"] == before["canary"]
        assert len(st["canary"]) == 2 and len(st["rest"]) == 6, st
        assert [h[1] for h in st["history"]] == ["canary", "all", "done"], st["history"]
        # The canary had it before anyone else was asked (first reports: a restarted
        # rollout sends the stage's commands again, and the devices report again).
        all_asked = st["issued"]["all"]
        assert all(st["devices"][d]["since"] < all_asked for d in st["canary"]), st
        assert all(st["devices"][d]["since"] >= all_asked for d in st["rest"]), st
        assert all(r["ok"] and r["artifact_version"] == 2 for r in st["devices"].values())
        assert [_runs(tmp_path, k) for k in range(DEVICES)] == [2] * DEVICES
        seen = _watched(mosquitto.url, job, keys)  # what the dashboard shows
        assert (seen["stage"], seen["canary"], seen["rest"]) == ("done", st["canary"],
                                                                 st["rest"])
        assert all(r["ok"] and r["artifact_version"] == 2 for r in seen["devices"].values())
        assert set(seen["devices"]) == set(st["devices"])
        code, out, _ = _rollout(tmp_path, mosquitto.url, job, v2, keys)  # restarted: done
        assert code == 0 and "stage done" in out, out
    finally:
        _stop(procs)


def test_broken_artifact_rolls_the_canary_back(tmp_path, mosquitto):
    from device_runtime.predictor import Predictor

    job = "roll-2"
    keys, procs = _fleet(tmp_path, mosquitto.url, job)
    try:
        bad = tiny_release(tmp_path / "v2", job, 2, keys.server_key, PROFILES, broken=True)
        code, out, st = _rollout(tmp_path, mosquitto.url, job, bad, keys)
        assert code == 1, out
        assert st["stage"] == "rolled-back" and "cannot load" in st["reason"], st
        assert [h[1] for h in st["history"]] == ["canary", "rolling-back", "rolled-back"]
        assert set(st["devices"]) == set(st["canary"]), st  # the rest never asked
        seen = _watched(mosquitto.url, job, keys)
        assert seen["stage"] == "rolled-back" and "cannot load" in seen["reason"], seen
        assert all(st["devices"][d]["action"] == "rollback" and st["devices"][d]["ok"]
                   and st["devices"][d]["artifact_version"] == 1 for d in st["canary"]), st
        for k in range(DEVICES):  # every device still runs a model that loads
            assert _runs(tmp_path, k) == 1
            pred = Predictor.from_manifest(tmp_path / "models" / f"dev-{k}" / "current",
                                           PROFILES[k % 2])
            assert pred.predict(np.zeros((3, 40), np.float32)).shape == (3,)
    finally:
        _stop(procs)


def test_a_much_slower_variant_rolls_the_canary_back(tmp_path, mosquitto):
    job = "roll-3"
    keys, procs = _fleet(tmp_path, mosquitto.url, job, devices=4)
    try:  # two hidden layers of 1024: ~30x the per-sample latency of version 1
        slow = tiny_release(tmp_path / "v2", job, 2, keys.server_key, PROFILES, hidden=1024)
        code, out, st = _rollout(tmp_path, mosquitto.url, job, slow, keys, "2s",
                                 "--max-latency-ratio", "4", "--max-payload", "131072")
        assert code == 1, out
        assert st["stage"] == "rolled-back" and "canary latency" in st["reason"], st
        (d,) = st["canary"]
        assert st["devices"][d]["ok"] and st["devices"][d]["action"] == "rollback", st
        assert [_runs(tmp_path, k) for k in range(4)] == [1] * 4
    finally:
        _stop(procs)
