"""The Raspberry Pi path on an arm64 userland (issue 23): a bundle installed offline
inside a Debian bookworm arm64 root run by qemu-user, its `fedge device` in FedAvg
(training with PyPI's aarch64 CPU torch, a version other than the server's) and
EcoFed (no torch) against a host `fedge serve` over mutual TLS, and the exported
artifacts run in aarch64 ONNX Runtime against x86's.

Opt-in (FEDGE_ARM64=1: 30+ minutes under emulation, CI leaves it out); skipped, saying
why, where the bed cannot run: not root, binfmt_misc not mountable, or no cached root
and wheelhouse (`sudo tools/arm64/build_root.sh` makes both; the tests themselves use
no network). See docs/deploy.md, "An arm64 test bed".
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from testkit import arm64
from testkit.brokers import Mosquitto
from testkit.field import finish, prepare_job, start_server
from testkit.timing import scaled
from tests.conftest import EXPORT_JOB, run_fedge

# Decided at collection: a skip in a fixture would come after the session's export.
UNUSABLE = arm64.unusable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(UNUSABLE is not None,
                                                   reason=UNUSABLE or "")]
# The agent's model for the job prepare_job makes, as the device's torch builds it.
STATE_SPEC = """
import json, sys, torch
from device_runtime.training.models import ModelConfig, build_model
m = build_model(ModelConfig.from_json(json.load(open(sys.argv[1]))))
state = {k: [str(v.dtype), list(v.shape)] for k, v in m.state_dict().items()}
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "state": state}))
"""


@pytest.fixture(scope="module")
def bed() -> arm64.Bed:
    return arm64.Bed(arm64.ROOT_DIR, arm64.WHEELS)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("arm64")


@pytest.fixture(scope="module")
def sec(work, export_key) -> tuple[Path, int, int]:
    """`fedge secure init` for pi-1: (DIR, the devices' port, the aggregator's port)."""
    from broker_server.embedded import free_port

    port, agg_port = free_port(), free_port()
    code, _, err = run_fedge("secure", "init", "--devices", "pi-1", "--out",
                             str(work / "sec"), "--port", str(port), "--aggregator-port",
                             str(agg_port), "--signing-key", str(export_key.path))
    assert code == 0, err
    return work / "sec", port, agg_port


@pytest.fixture(scope="module")
def job(work) -> Path:
    (work / "job").mkdir()
    return prepare_job(work / "job", devices=1)


def _install(bed: arm64.Bed, work: Path, manifest: Path, sec, strategy: str,
             export_key) -> Path:
    """`fedge bundle` on the host, install.sh inside the root, offline from the
    wheelhouse; returns the prefix (the same path inside the root)."""
    d, port, _ = sec
    out = work / strategy
    out.mkdir()
    bundle = out / "pi-1.tar.gz"
    code, _, err = run_fedge("bundle", "--manifest", str(manifest), "--device", "rpi4",
                             "--broker", f"mqtts://localhost:{port}", "--job", EXPORT_JOB,
                             "--id", "pi-1", "--out", str(bundle), "--strategy", strategy,
                             "--data", str(work / "job" / "data" / "device-0.npz"),
                             "--credentials", str(d / "credentials" / "pi-1.json"),
                             "--pin-wheels", str(bed.wheels))
    assert code == 0, err
    with tarfile.open(bundle) as tf:
        tf.extractall(out, filter="data")
    from device_runtime.keys import PublicKey

    fp = hashlib.sha256(PublicKey.load(export_key.public_path).raw()).hexdigest()
    prefix = out / "opt"
    p = bed.run(["sh", str(out / "fedge-pi-1" / "install.sh"), "--prefix", str(prefix),
                 "--wheelhouse", str(bed.wheels), "--no-systemd", "--fingerprint", fp],
                [work, bed.wheels], timeout=scaled(1800))
    assert p.returncode == 0, p.stderr[-3000:]
    print(f"arm64: {strategy} venv {arm64.du_bytes(prefix / 'venv') / 1e6:.1f} MB")
    return prefix


@pytest.fixture(scope="module")
def ecofed_prefix(bed, work, fleet_export, sec, job, export_key) -> Path:
    return _install(bed, work, fleet_export, sec, "ecofed", export_key)


def _rounds(bed, work, sec, job, prefix: Path, strategy: str, extra: list[str]) -> str:
    """2 rounds of ``strategy``: the host's serve, the root's device; the device log."""
    d, port, agg_port = sec
    run = work / f"{strategy}-run"
    run.mkdir()
    broker = Mosquitto(run / "mosq", port=port, config=d / "mosquitto.conf")
    broker.start()
    try:
        server = start_server(f"mqtts://localhost:{agg_port}", EXPORT_JOB, run, job, rounds=2,
                              min_devices=1, round_timeout=scaled(900),
                              extra=["--profiles", "rpi4", "--credentials",
                                     str(d / "credentials" / "aggregator.json"), *extra])
        device = bed.popen([str(prefix / "venv" / "bin" / "fedge"), "device", "--config",
                            str(prefix / "etc" / "device.toml"),
                            "--idle-timeout", f"{scaled(600):g}"], [work], run / "device.log",
                           env=[f"FEDGE_HOME={prefix / 'var'}"])
        codes = finish([server], timeout=2400) + finish([device], timeout=300)
    finally:
        broker.stop()
    log = (run / "device.log").read_text()
    assert codes == [0, 0], (run / "server.log").read_text()[-2000:] + log[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert [r["devices_reporting"] for r in report["rounds"]] == [1, 1]
    assert not report.get("device_errors")
    return log


def test_fedavg_trains_on_arm64_with_pypis_cpu_torch(bed, work, fleet_export, sec, job,
                                                       export_key):
    prefix = _install(bed, work, fleet_export, sec, "fedavg", export_key)
    py = str(prefix / "venv" / "bin" / "python")
    probe = bed.run([py, "-c", "import importlib.metadata as m; print(sorted("
                     "d.metadata['Name'].lower() for d in m.distributions()))"],
                    [work], timeout=scaled(300))
    names = probe.stdout
    assert "'torch'" in names and "nvidia" not in names and "triton" not in names, names
    # The wire carries tensors named and shaped by the server's torch; the device's
    # (another version) must build the very same state dict.
    from toolkit.model import checkpoint

    cfg = work / "model.json"
    cfg.write_text(json.dumps(checkpoint.load(job).config.to_json()))
    p = bed.run([py, "-c", STATE_SPEC, str(cfg)], [work], timeout=scaled(600))
    assert p.returncode == 0, p.stderr[-2000:]
    device = json.loads(p.stdout)
    host = checkpoint.load(job).model.state_dict()
    assert device["torch"].startswith("2.10.0") and device["cuda"] is None  # a CPU build
    assert device["state"] == {k: [str(v.dtype), list(v.shape)] for k, v in host.items()}
    log = _rounds(bed, work, sec, job, prefix, "fedavg", [])
    assert "pi-1: trained 2 rounds" in log


def test_ecofed_runs_on_arm64_without_torch(bed, work, sec, job, ecofed_prefix):
    py = str(ecofed_prefix / "venv" / "bin" / "python")
    probe = bed.run([py, "-c", "import importlib.util as u, platform; "
                     "print(platform.machine(), u.find_spec('torch'))"], [work],
                    timeout=scaled(300))
    assert probe.stdout.split() == ["aarch64", "None"], probe.stdout + probe.stderr
    log = _rounds(bed, work, sec, job, ecofed_prefix, "ecofed",
                  ["--strategy", "ecofed", "--codec", "act4", "--period", "1"])
    assert "pi-1: trained 2 rounds" in log


def _parity_jobs(manifest: Path, x: np.ndarray, out: Path, side: str,
                 heads: dict[tuple, Path] | None) -> list[dict]:
    """ort_outputs.py jobs for every ONNX/ORT artifact of the export: full models, heads
    and bases on the test set (``heads`` None), or tails on their head's fp32 output as
    the host computed it (the same input on both sides)."""
    data = json.loads(manifest.read_text())
    np.save(out / "x.npy", x, allow_pickle=False)
    jobs = []
    for name, entry in sorted(data["devices"].items()):
        for a in entry["artifacts"]:
            if (a["role"] == "tail") != (heads is not None):
                continue
            src = out / "x.npy" if heads is None else heads[(name, a["index"])]
            idx = "" if a["index"] is None else a["index"]
            key = f"{name}.{a['role']}{idx}.{a['precision']}.{a['format']}"
            jobs.append({"model": str(manifest.parent / a["path"]), "input": str(src),
                         "output": str(out / f"{key}.{side}.npy"), "key": key,
                         "precision": a["precision"], "device": name, "role": a["role"],
                         "index": a["index"]})
    return jobs


def _run_host(jobs: list[dict], out: Path, tag: str) -> None:
    import subprocess
    import sys

    spec = out / f"{tag}.json"
    spec.write_text(json.dumps(jobs))
    subprocess.run([sys.executable, str(arm64.TOOLS / "ort_outputs.py"), str(spec)],
                   check=True, capture_output=True, timeout=scaled(600))


def test_artifacts_agree_across_architectures(bed, work, fleet_export, mnist1d,
                                              ecofed_prefix):
    from exporters.parity import compare

    out = work / "parity"
    out.mkdir()
    x = np.ascontiguousarray(mnist1d.x_test, np.float32)
    first = _parity_jobs(fleet_export, x, out, "x86", None)
    _run_host(first, out, "x86-first")
    heads = {(j["device"], j["index"]): Path(j["output"]) for j in first
             if j["role"] == "head" and j["precision"] == "fp32" and j["key"].endswith("onnx")}
    tails = _parity_jobs(fleet_export, x, out, "x86", heads)
    _run_host(tails, out, "x86-tails")
    arm = [dict(j, output=j["output"].replace(".x86.npy", ".arm.npy")) for j in first + tails]
    (out / "arm.json").write_text(json.dumps(arm))
    shutil.copy(arm64.TOOLS / "ort_outputs.py", out)  # the very script the host ran
    p = bed.run([str(ecofed_prefix / "venv" / "bin" / "python"), str(out / "ort_outputs.py"),
                 str(out / "arm.json")], [work, fleet_export.parent],
                timeout=scaled(1800))
    assert p.returncode == 0 and "on aarch64" in p.stdout, p.stderr[-2000:]
    rows = []
    for j in first + tails:
        ref = np.load(j["output"], allow_pickle=False)
        got = np.load(j["output"].replace(".x86.npy", ".arm.npy"), allow_pickle=False)
        labels = mnist1d.y_test if ref.ndim == 2 else None
        rows.append((j, compare(ref, got, labels)))
        print(f"arm64 parity {j['key']}: {json.dumps(rows[-1][1])}")
    assert len(rows) >= 10
    for j, r in rows:
        if j["precision"] == "fp32":
            assert r["max_abs_err"] <= 1e-4, (j["key"], r)
        elif "top1_agreement" in r:
            assert r["top1_agreement"] >= 0.99, (j["key"], r)
        if "accuracy" in r:
            assert abs(r["accuracy"] - r["reference_accuracy"]) <= 0.002, (j["key"], r)
