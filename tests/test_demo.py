"""`fedge demo`, the README's main job, end to end (short run) on the embedded broker."""
import json

import pytest

from tests.conftest import run_fedge
from toolkit.field.fleet_keys import write_fleet_keys

pytestmark = pytest.mark.slow  # each test runs fedge subprocesses; the demo a whole job


def test_demo_runs_device_processes_over_the_embedded_broker(tmp_path):
    report = tmp_path / "demo.json"
    code, out, err = run_fedge("demo", "--devices", "3", "--rounds", "3",
                               "--workdir", str(tmp_path / "w"), "--json", str(report))
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["broker"] == "embedded" and r["strategy"] == "fedavg"
    assert r["codec"] == "fedmrn" and r["downlink"] == "int8"  # compressed both ways
    assert [x["round"] for x in r["rounds"]] == [1, 2, 3]
    for x in r["rounds"]:
        assert set(x) >= {"round", "accuracy", "uplink_bytes", "downlink_bytes",
                          "devices_reporting"}
        assert x["uplink_bytes"] > 0 and x["devices_reporting"] >= 2
    assert r["final_accuracy"] == r["rounds"][-1]["accuracy"] > 0.2
    assert report.with_suffix(".png").stat().st_size > 1000
    # Not a terminal: plain lines (toolkit/console.py), one per round, no control codes.
    assert "round 3/3  accuracy" in out and "\x1b" not in out
    for k in range(3):
        assert "trained" in (tmp_path / "w" / f"device-{k}.log").read_text()
    # each profile's own variant, exported and measured in ONNX Runtime
    profiles = {v["profile"]: v for v in r["variants"]}
    assert set(profiles) == {"rpi3b", "rpi4", "rpi5", "jetson-nano", "jetson-orin-nano",
                             "android-mid"}
    assert profiles["rpi3b"]["params"] < profiles["jetson-orin-nano"]["params"]
    assert "variant per profile" in out and "jetson-orin-nano" in out
    # the traffic line: this run's bytes against FedAvg fp32's, from the same run
    t = r["traffic"]
    sent = sum(x["uplink_bytes"] + x["downlink_bytes"] for x in r["rounds"])
    assert t["sent_bytes"] == sent and t["fedavg_fp32_bytes"] > 3 * sent
    assert f"{t['ratio']:.1f}x less" in out and "FedAvg with fp32 both ways" in out



def test_demo_writes_into_its_own_work_dir_and_clears_it_next_time(tmp_path):
    """No --json, no --workdir: nothing in the current folder; the work dir is
    $FEDGE_HOME/demo, named at the end, and the next demo clears the last one's."""
    import os

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    work = home / "demo"
    work.mkdir(parents=True)
    (work / ".fedge-demo").write_text("")
    (work / "stale-shard.npz").write_text("from the last demo")
    env = {"FEDGE_HOME": str(home)}
    code, out, err = run_fedge("demo", "--devices", "2", "--rounds", "1", "--no-variants",
                               "--eval-every", "0", cwd=cwd, env=env)
    assert code == 0, err
    assert os.listdir(cwd) == []
    assert json.loads((work / "demo.json").read_text())["rounds"][0]["round"] == 1
    assert not (work / "stale-shard.npz").exists() and (work / "broker.log").exists()
    assert f"in {work}" in out
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a demo's")
    code, _, err = run_fedge("demo", "--workdir", str(tmp_path / "mine"), cwd=cwd, env=env)
    assert code == 2 and "expected an empty folder or an earlier demo's" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a demo's"


def test_serve_bad_arguments_are_one_line(tmp_path):
    from tests.conftest import assert_one_line_error

    code, _, err = run_fedge("serve", "--job", "a/b", "--checkpoint", "x", "--state-dir",
                             str(tmp_path))
    assert_one_line_error(code, err, 2, "job id")
    code, _, err = run_fedge("serve", "--job", "j", "--checkpoint", "x", "--strategy", "magic",
                             "--state-dir", str(tmp_path))
    assert_one_line_error(code, err, 2, "unknown strategy 'magic'", "fedavg")
    code, _, err = run_fedge("device", "--broker", "http://x", "--job", "j", "--id", "d",
                             "--profile", "rpi4", "--data", str(tmp_path / "none.npz"))
    assert_one_line_error(code, err, 2, "--trust PUBKEY: expected the aggregator's public key")
    keys = write_fleet_keys(tmp_path / "keys", ["d"])
    code, _, err = run_fedge("device", "--broker", "http://x", "--job", "j", "--id", "d",
                             "--profile", "rpi4", "--data", str(tmp_path / "none.npz"),
                             "--trust", str(keys.server_pub))
    assert_one_line_error(code, err, 2, "--key FILE: expected this device's signing key")
    code, _, err = run_fedge("device", "--broker", "http://x", "--job", "j", "--id", "d",
                             "--profile", "rpi4", "--data", str(tmp_path / "none.npz"),
                             "--trust", str(keys.server_pub), "--key", str(keys.server_pub))
    assert_one_line_error(code, err, 2, "expected an Ed25519 private key, got a public key")
    code, _, err = run_fedge("device", "--broker", "http://x", "--job", "j", "--id", "d",
                             "--profile", "rpi4", "--data", str(tmp_path / "none.npz"),
                             "--trust", str(keys.server_pub), "--key", str(keys.device_key("d")))
    assert_one_line_error(code, err, 3, "does not exist")
    code, _, err = run_fedge("device", "--broker", "http://x", "--job", "j", "--id", "d",
                             "--profile", "toaster", "--data", "x.npz")
    assert_one_line_error(code, err, 2, "unknown device profile 'toaster'")
