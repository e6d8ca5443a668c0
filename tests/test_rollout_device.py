"""A device's side of a rollout, in process against a real Mosquitto: it installs a
signed release and switches, refuses replayed, misaddressed and foreign commands,
keeps its version when an artifact does not match the manifest, and rolls back only
from the version the command names. ``fedge rollout``'s usage errors are one line."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from device_runtime import messages, wire
from device_runtime.agent import AgentOptions, DeviceAgent
from device_runtime.errors import UnauthenticatedError
from device_runtime.keys import PublicKey, Signer
from device_runtime.transport.mqtt import MqttTransport
from testkit.field import fleet_keys
from testkit.releases import tiny_release
from tests.conftest import assert_one_line_error, run_fedge
from toolkit.field.fleet_keys import server_trust
from toolkit.field.rollout import Driver, RolloutJob
from toolkit.field.rollout_state import RolloutState

JOB = "roll-dev"


@pytest.fixture
def fleet(tmp_path, mosquitto, monkeypatch):
    monkeypatch.setenv("FEDGE_HOME", str(tmp_path / "home"))  # the device's own ledger
    keys = fleet_keys(tmp_path, 1)
    v1 = tiny_release(tmp_path / "v1", JOB, 1, keys.server_key, ("rpi4",), seed=1)
    t = MqttTransport(mosquitto.url, "dev-0")
    t.connect()
    opts = AgentOptions(JOB, "dev-0", "rpi4", manifest=str(v1), trust=str(keys.server_pub),
                        key=Signer.load(keys.device_key("dev-0")),
                        server_key=PublicKey.load(keys.server_pub),
                        models_dir=str(tmp_path / "models"))
    agent = DeviceAgent(t, opts, np.zeros((4, 40), np.float32), np.zeros(4, np.int64))
    agent.check_export()
    op = MqttTransport(mosquitto.url, "operator")
    op.connect()
    trust = server_trust(JOB, None, str(keys.server_key), str(keys.registry), None)
    yield tmp_path, keys, agent, trust, op
    t.close()
    op.close()


def _release(tmp_path, keys, trust, op, version: int, **kw):
    from device_runtime.manifest import load_manifest

    man = tiny_release(tmp_path / f"v{version}", JOB, version, keys.server_key, ("rpi4",),
                       seed=version, **kw)
    st = RolloutState(JOB, "r1", version, str(man), "")
    Driver(RolloutJob(man, JOB, "mqtt://x:1"), trust, op, st)._publish_release(
        load_manifest(man), man.read_bytes())
    return hashlib.sha256(man.read_bytes()).hexdigest()


def _cmd(trust, action: str, version: int, replaces: int, sha: str = "", issued=10.0,
         to: str = "dev-0", rollout: str = "r1") -> bytes:
    cmd = messages.Rollout(rollout=rollout, action=action, version=version, replaces=replaces,
                           manifest_sha256=sha, issued=issued)
    return trust.seal(cmd, round_=version, nonce=rollout, to=to)


def test_install_replay_and_rollback(fleet):
    tmp_path, keys, agent, trust, op = fleet
    store = agent.rollouts.store
    assert store.current == 1 and agent.runtime["artifact_version"] == 1
    sha = _release(tmp_path, keys, trust, op, 2)
    agent.rollouts.handle(_cmd(trust, "install", 2, 1, sha, issued=10.0))
    rep = agent.runtime["rollout"]
    assert rep["ok"] and rep["latency_ms"] > 0 and rep["previous_latency_ms"] > 0, rep
    assert (store.current, store.previous) == (2, 1)
    assert os.readlink(tmp_path / "models" / "current") == "v2"
    with pytest.raises(UnauthenticatedError, match="rollout.issued: expected 10.000 or newer"):
        agent.rollouts.handle(_cmd(trust, "rollback", 1, 2, issued=5.0))
    with pytest.raises(UnauthenticatedError, match="auth.to"):
        agent.rollouts.handle(_cmd(trust, "rollback", 1, 2, issued=11.0, to="dev-9"))
    forged = messages.seal(messages.Rollout(rollout="r1", action="rollback", version=1,
                                            replaces=2, issued=12.0), JOB, "server",
                           Signer.generate(), 1, "r1", "dev-0")
    with pytest.raises(UnauthenticatedError):
        agent.rollouts.handle(forged)
    assert store.current == 2  # none of them changed anything
    agent.rollouts.handle(_cmd(trust, "rollback", 1, 3, issued=13.0))  # it runs 2, not 3
    assert not agent.runtime["rollout"]["ok"] and "not 3" in agent.runtime["rollout"]["error"]
    assert store.current == 2
    agent.rollouts.handle(_cmd(trust, "rollback", 1, 2, issued=14.0))
    assert agent.runtime["rollout"]["ok"] and store.current == 1
    ledger = json.loads((tmp_path / "home" / "accepted-exports.json").read_text())
    assert ledger["jobs"][JOB]["version"] == 1  # the operator's signed word took it back


def test_an_artifact_that_is_not_the_manifests_is_refused(fleet):
    tmp_path, keys, agent, trust, op = fleet
    sha = _release(tmp_path, keys, trust, op, 2)
    from device_runtime.manifest import load_manifest

    art = load_manifest(tmp_path / "v2").device("rpi4").artifacts[0]
    other = np.frombuffer(b"some other bytes", np.uint8)  # signed, but not the artifact
    op.publish(agent.topics.release(2, art.sha256), trust.frame(wire.Frame(
        "release", JOB, 2, "server", "raw", {"data": other})), retain=True)
    agent.rollouts.handle(_cmd(trust, "install", 2, 1, sha))
    rep = agent.runtime["rollout"]
    assert not rep["ok"] and "fails the manifest's sha256" in rep["error"], rep
    assert agent.rollouts.store.current == 1
    agent.rollouts.handle(_cmd(trust, "install", 2, 1, "0" * 64, issued=11.0))
    assert "not the one the command names" in agent.runtime["rollout"]["error"]


@pytest.mark.parametrize("args, needle", [
    (["--canary", "150%"], "--canary: expected a share in (0%, 100%], got 150%"),
    (["--canary", "lots"], "--canary: expected a share such as 10% or 0.1, got 'lots'"),
    (["--hold", "ten"], "--hold: expected a duration such as 90s, 10m or 1h, got 'ten'"),
    (["--max-latency-ratio", "0.5"], "--max-latency-ratio: expected >= 1, got 0.5"),
])
def test_rollout_usage_errors(args, needle, tmp_path):
    code, _, err = run_fedge("rollout", "--job", "j", "--manifest", str(tmp_path / "m.json"),
                             "--broker", "mqtt://127.0.0.1:1", *args)
    assert_one_line_error(code, err, 2, needle)


def test_rollout_status_of_a_damaged_state_file(tmp_path):
    bad = tmp_path / "state.json"
    bad.write_text("{nope")
    code, _, err = run_fedge("rollout", "--job", "j", "--status", "--state", str(bad))
    assert_one_line_error(code, err, 2, f"--state {bad}: not a readable rollout state")


def test_a_restarted_device_runs_the_newest_it_has(fleet):
    tmp_path, keys, agent, trust, op = fleet
    agent.rollouts.handle(_cmd(trust, "install", 2, 1, _release(tmp_path, keys, trust, op, 2)))
    assert agent.rollouts.store.current == 2

    def restarted(manifest) -> DeviceAgent:
        again = DeviceAgent(agent.t, AgentOptions(
            JOB, "dev-0", "rpi4", manifest=str(manifest), trust=agent.opts.trust,
            key=agent.opts.key, server_key=agent.opts.server_key,
            models_dir=agent.opts.models_dir), agent.x, agent.y)
        again.check_export()
        return again
    # Started with v1 again (its unit's --manifest): the store's v2, not a refused rollback.
    assert restarted(tmp_path / "v1" / "manifest.json").runtime["artifact_version"] == 2
    v3 = tiny_release(tmp_path / "v3", JOB, 3, keys.server_key, ("rpi4",), seed=3)
    again = restarted(v3)  # a bundle re-installed with a newer export: that one
    assert again.runtime["artifact_version"] == 3 and again.rollouts.store.current == 3
    assert again.rollouts.store.previous == 2
