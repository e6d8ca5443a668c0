"""`fedge bundle` -> `install.sh` -> the agent as a service: installed offline from a
local wheelhouse (pinned by hash) into a fresh venv without torch, it joins a job on a
real broker. install.sh runs nothing from a bundle that a key the device already has
did not sign."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from testkit.brokers import Mosquitto
from tests.conftest import EXPORT_JOB, ROOT, assert_one_line_error, run_fedge
from testkit.field import finish, prepare_job, start_server
from testkit.timing import scaled

# Every test here builds a bundle (a wheel of fedge, the wheelhouse, a signed archive) or
# installs one: the quick loop (-m "not slow") leaves them to the full run.
pytestmark = pytest.mark.slow

WHEELHOUSE = Path(os.environ.get("FEDGE_WHEELHOUSE") or ROOT / ".wheelhouse")


def _wheelhouse() -> Path:
    if not any(WHEELHOUSE.glob("onnxruntime-*.whl")):
        pytest.fail(f"no wheelhouse at {WHEELHOUSE}: run `fedge wheelhouse --out .wheelhouse` "
                    "once (README's test command does)")
    return WHEELHOUSE


def _device_env() -> dict:
    """What a device has: no checkout on the path, no pip config pointing at local
    indexes or a torch wheel."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    return dict(env, PIP_CONFIG_FILE=os.devnull, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")


def _fingerprint(public_path: Path) -> str:
    from device_runtime.keys import PublicKey

    return hashlib.sha256(PublicKey.load(public_path).raw()).hexdigest()


def _bundle(tmp_path: Path, manifest: Path, url: str, job: str, *extra: str) -> Path:
    from toolkit.deploy.signing import default_key_path, public_key_path

    out = tmp_path / "pi-1.tar.gz"
    code, stdout, err = run_fedge("bundle", "--manifest", str(manifest), "--device", "rpi4",
                                  "--broker", url, "--job", job, "--id", "pi-1",
                                  "--out", str(out), *extra)
    assert code == 0, err
    assert "wrote" in stdout
    fp = _fingerprint(public_key_path(default_key_path()))
    assert f"signed by key {fp[:16]}; on the device: install.sh --fingerprint {fp}" in stdout
    return out


def _unpack(bundle: Path, dest: Path) -> Path:
    with tarfile.open(bundle) as tf:
        tf.extractall(dest, filter="data")
    return dest / "fedge-pi-1"


def _install(unpacked: Path, prefix: Path, *args: str) -> subprocess.CompletedProcess:
    """install.sh as a user would run it, up to where it refuses (no venv is made)."""
    return subprocess.run(["sh", str(unpacked / "install.sh"), "--prefix", str(prefix),
                           "--no-systemd", *args], env=_device_env(), capture_output=True,
                          text=True, timeout=scaled(120))


def _refused(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode != 0, p.stdout
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("install.sh: error: ") and needle in last, p.stderr


def _sign_sums(unpacked: Path, signer) -> None:
    """SHA256SUMS made anew over the bundle's files, signed by ``signer``."""
    from device_runtime.manifest import sha256_file

    files = sorted(f for f in unpacked.rglob("*") if f.is_file()
                   and f.relative_to(unpacked).as_posix() not in ("SHA256SUMS",
                                                                  "SHA256SUMS.sig"))
    sums = "".join(f"{sha256_file(f)}  {f.relative_to(unpacked).as_posix()}\n" for f in files)
    (unpacked / "SHA256SUMS").write_text(sums)
    (unpacked / "SHA256SUMS.sig").write_bytes(signer.sign(sums.encode()))


def _forge(unpacked: Path, marker: Path) -> None:
    """The attack from issue 20: the manifest re-signed with the attacker's key, trust.pub
    swapped for theirs, a line added to bundle.env, the sums regenerated (and signed by
    them, as any attacker can)."""
    from device_runtime.keys import Signer
    from toolkit.deploy.signing import SigningKey, sign_manifest

    attacker = Signer.generate()
    sign_manifest(unpacked / "artifacts" / "manifest.json",
                  SigningKey(attacker.key, Path("attacker.key"), Path("attacker.pub")))
    (unpacked / "trust.pub").write_bytes(attacker.public.pem())
    with open(unpacked / "bundle.env", "a") as f:
        f.write(f"touch {marker}\n")
    _sign_sums(unpacked, attacker)


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory, fleet_export) -> Path:
    """One bundle signed by the session's key, for the tests that unpack and alter it."""
    return _bundle(tmp_path_factory.mktemp("signed"), fleet_export, "mqtt://broker:1883",
                   EXPORT_JOB)


@pytest.fixture
def secure_broker(tmp_path, export_key):
    """`fedge secure init` for pi-1 and a real Mosquitto running its TLS config: (DIR,
    the devices' URL, the aggregator's URL). The aggregator signs with the operator's
    key, the one that signs the export: the device trusts one key for both."""
    from broker_server.embedded import free_port

    port, agg_port = free_port(), free_port()
    code, _, err = run_fedge("secure", "init", "--devices", "pi-1", "--out",
                             str(tmp_path / "sec"), "--port", str(port), "--aggregator-port",
                             str(agg_port), "--signing-key", str(export_key.path))
    assert code == 0, err
    m = Mosquitto(tmp_path / "mosq", port=port, config=tmp_path / "sec" / "mosquitto.conf")
    m.start()
    yield tmp_path / "sec", f"mqtts://localhost:{port}", f"mqtts://localhost:{agg_port}"
    m.stop()


def test_bundle_installs_offline_without_torch_and_joins_a_job_over_tls(tmp_path,
                                                                        secure_broker,
                                                                        fleet_export,
                                                                        export_key):
    wheels = _wheelhouse()
    sec, url, agg_url = secure_broker
    work = tmp_path / "run"
    work.mkdir()
    ckpt = prepare_job(work, devices=1)
    job = EXPORT_JOB  # the job the export is made for: the device refuses another
    bundle = _bundle(tmp_path, fleet_export, url, job, "--strategy", "ecofed",
                     "--data", str(work / "data" / "device-0.npz"),
                     "--credentials", str(sec / "credentials" / "pi-1.json"),
                     "--pin-wheels", str(wheels))
    assert bundle.stat().st_mode & 0o777 == 0o600  # it holds the device's private key
    unpacked = _unpack(bundle, tmp_path / "unpacked")
    shipped = sorted(p.relative_to(unpacked / "artifacts").as_posix()
                     for p in (unpacked / "artifacts").rglob("*.onnx"))
    assert shipped and all(s.startswith("rpi4/") for s in shipped)  # its artifacts only
    assert (unpacked / "certs" / "pi-1.key").stat().st_mode & 0o777 == 0o600
    # the device's signing key and the aggregator's public key travel with it
    assert (unpacked / "certs" / "pi-1.signing.key").stat().st_mode & 0o777 == 0o600
    assert (unpacked / "server.pub").read_bytes() == (sec / "server.pub").read_bytes()
    pins = (unpacked / "requirements.lock").read_text().splitlines()
    assert any(p.startswith("onnxruntime==") for p in pins)
    assert all(" --hash=sha256:" in p for p in pins) and not any("torch" in p for p in pins)

    prefix = tmp_path / "opt" / "fedge"
    p = subprocess.run(["sh", str(unpacked / "install.sh"), "--prefix", str(prefix),
                        "--wheelhouse", str(wheels), "--no-systemd", "--fingerprint",
                        _fingerprint(export_key.public_path)], env=_device_env(),
                       cwd=tmp_path, capture_output=True, text=True, timeout=scaled(600))
    assert p.returncode == 0, p.stderr[-2000:]
    # The next bundle is checked by the script and key this install left, with no option.
    again = subprocess.run(["sh", str(prefix / "install.sh"), "--bundle", str(unpacked),
                            "--prefix", str(prefix), "--verify-only"], env=_device_env(),
                           capture_output=True, text=True, timeout=scaled(120))
    assert again.returncode == 0, again.stderr
    assert f"signed by key {export_key.key_id} ({prefix}/trust.pub)" in again.stdout
    py = prefix / "venv" / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import toolkit, importlib.util as u; "
                            "print(toolkit.__file__); print(u.find_spec('torch'))"],
                           env=_device_env(), cwd=tmp_path, capture_output=True, text=True)
    where, torch_spec = probe.stdout.split()[:2]
    assert where.startswith(str(prefix)) and torch_spec == "None", probe.stdout + probe.stderr
    unit = prefix / "etc" / "fedge-device.service"
    assert f"ExecStart={prefix}/venv/bin/fedge device --config {prefix}/etc/device.toml" \
        in unit.read_text()
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                           text=True, timeout=scaled(60))
        assert v.returncode == 0, v.stderr

    server = start_server(agg_url, job, work, ckpt, rounds=1, min_devices=1,
                          round_timeout=scaled(60),
                          extra=["--strategy", "ecofed", "--codec", "act4", "--profiles", "rpi4",
                                 "--credentials", str(sec / "credentials" / "aggregator.json")])
    device = subprocess.Popen([str(prefix / "venv" / "bin" / "fedge"), "device", "--config",
                               str(prefix / "etc" / "device.toml"),
                               "--idle-timeout", f"{scaled(120):g}"],
                              env=_device_env(), cwd=prefix / "var",
                              stdout=open(work / "device.log", "wb"), stderr=subprocess.STDOUT)
    codes = finish([server], timeout=240) + finish([device], timeout=60)
    log = (work / "device.log").read_text()
    assert codes == [0, 0], (work / "server.log").read_text()[-1500:] + log[-1500:]
    report = json.loads((work / "report.json").read_text())
    assert [r["devices_reporting"] for r in report["rounds"]] == [1]
    assert "pi-1: trained 1 rounds" in log
    assert report["broker"] == agg_url and not report.get("device_errors")


def test_a_modified_bundle_installs_nothing(tmp_path, signed_bundle, export_key):
    unpacked = _unpack(signed_bundle, tmp_path / "unpacked")
    config = unpacked / "device.toml"
    config.write_text(config.read_text().replace("mqtt://broker:1883", "mqtt://evil:1883"))
    prefix = tmp_path / "opt"
    p = _install(unpacked, prefix, "--trust", str(export_key.public_path))
    _refused(p, "bundle files do not match SHA256SUMS")
    assert not prefix.exists()


@pytest.mark.parametrize("how", ["no key", "--trust", "--fingerprint", "installed key"])
def test_a_re_signed_bundle_with_its_own_trust_pub_runs_nothing(tmp_path, signed_bundle,
                                                                export_key, how):
    """Issue 20: re-signed manifest, swapped trust.pub, a line added to bundle.env,
    regenerated sums: refused before anything in the bundle runs (the old install.sh
    sourced bundle.env and touched the marker)."""
    unpacked = _unpack(signed_bundle, tmp_path / "unpacked")
    marker = tmp_path / "marker"
    _forge(unpacked, marker)
    prefix = tmp_path / "opt"
    args, needle = {
        "no key": ([], "no key to verify this bundle with: give --trust PUBKEY.pem or "
                   "--fingerprint"),
        "--trust": (["--trust", str(export_key.public_path)],
                    f"SHA256SUMS is not signed by the trusted key {export_key.key_id}"),
        "--fingerprint": (["--fingerprint", _fingerprint(export_key.public_path)],
                          "the bundle's trust.pub is key "),
        "installed key": ([], f"SHA256SUMS is not signed by the trusted key "
                          f"{export_key.key_id} ({prefix}/trust.pub)"),
    }[how]
    if how == "installed key":  # an earlier install left the operator's key
        prefix.mkdir()
        shutil.copy(export_key.public_path, prefix / "trust.pub")
    p = _install(unpacked, prefix, *args)
    assert not marker.exists()
    _refused(p, needle)
    assert not prefix.exists() or [f.name for f in prefix.iterdir()] == ["trust.pub"]


@pytest.mark.parametrize("how", ["--trust", "--fingerprint", "key id", "installed key"])
def test_a_bundle_signed_by_the_trusted_key_verifies(tmp_path, signed_bundle, export_key,
                                                     how):
    unpacked = _unpack(signed_bundle, tmp_path / "unpacked")
    prefix = tmp_path / "opt"
    fp = _fingerprint(export_key.public_path)
    args = {"--trust": ["--trust", str(export_key.public_path)],
            "--fingerprint": ["--fingerprint", fp.upper()], "key id": ["--fingerprint", fp[:16]],
            "installed key": []}[how]
    if how == "installed key":
        prefix.mkdir()
        shutil.copy(export_key.public_path, prefix / "trust.pub")
    p = _install(unpacked, prefix, "--verify-only", *args)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"bundle for pi-1 verified: signed by key {export_key.key_id}")


@pytest.mark.parametrize("line, needle", [
    ("touch {marker}", "bundle.env line 9: expected KEY=VALUE, got 'touch "),
    ("JOB=j1$(touch {marker})", "bundle.env line 9: JOB: expected 1 or more of"),
    ("PATH=/tmp/evil", "bundle.env line 9: unknown key 'PATH'; valid keys: FEDGE_VERSION"),
])
def test_bundle_env_is_data_even_in_a_signed_bundle(tmp_path, signed_bundle, export_key,
                                                    line, needle):
    from device_runtime.keys import Signer

    unpacked = _unpack(signed_bundle, tmp_path / "unpacked")
    marker = tmp_path / "marker"
    with open(unpacked / "bundle.env", "a") as f:
        f.write(line.format(marker=marker) + "\n")
    _sign_sums(unpacked, Signer.load(export_key.path))
    p = _install(unpacked, tmp_path / "opt", "--trust", str(export_key.public_path))
    assert not marker.exists()
    _refused(p, needle)


@pytest.mark.parametrize("change, needle", [
    ("extra", "bundle: wheels/evil-1.0-py3-none-any.whl is not listed in SHA256SUMS"),
    ("link", "bundle: ./artifacts/link is neither a file nor a folder"),
    ("unsigned", "the bundle has no SHA256SUMS and SHA256SUMS.sig (unsigned)"),
])
def test_files_outside_the_signed_list_install_nothing(tmp_path, signed_bundle, export_key,
                                                       change, needle):
    unpacked = _unpack(signed_bundle, tmp_path / "unpacked")
    if change == "extra":
        (unpacked / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    elif change == "link":
        (unpacked / "artifacts" / "link").symlink_to("/etc/hostname")
    else:
        (unpacked / "SHA256SUMS.sig").unlink()
    p = _install(unpacked, tmp_path / "opt", "--trust", str(export_key.public_path))
    _refused(p, needle)
    assert not (tmp_path / "opt").exists()


def test_the_same_export_gives_the_same_bundle_bytes(tmp_path, fleet_export):
    a = _bundle(tmp_path, fleet_export, "mqtt://broker:1883", EXPORT_JOB)
    first = a.read_bytes()
    b = _bundle(tmp_path, fleet_export, "mqtt://broker:1883", EXPORT_JOB)
    assert b.read_bytes() == first
    assert b.stat().st_mode & 0o777 == 0o600 and list(tmp_path.iterdir()) == [b]


@pytest.mark.parametrize("change, needle", [
    (("--device", "no-such-board"), "no device 'no-such-board'"),
    (("--broker", "http://broker"), "scheme must be mqtt or mqtts"),
    (("--strategy", "fedsgd"), "unknown strategy 'fedsgd'"),
    (("--id", "bad id"), "device id"),
    (("--trust", "/no/such.pub"), "--trust /no/such.pub"),
    (("--signing-key", "/no/such.key"), "signing key /no/such.key does not exist"),
    (("--pin-wheels", "/no/such"), "--pin-wheels /no/such: no such folder"),
])
def test_bad_bundle_inputs_are_one_line_and_write_nothing(tmp_path, fleet_export, change,
                                                          needle):
    args = {"--manifest": str(fleet_export), "--device": "rpi4",
            "--broker": "mqtt://broker:1883", "--job": EXPORT_JOB, "--id": "pi-1",
            "--out": str(tmp_path / "b.tar.gz")}
    args[change[0]] = change[1]
    code, _, err = run_fedge("bundle", *[x for kv in args.items() for x in kv])
    assert_one_line_error(code, err, 2, needle)
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_whose_trust_pub_is_not_its_signer_is_not_made(tmp_path, fleet_export,
                                                                 export_key):
    from device_runtime.keys import Signer

    other = tmp_path / "other.pub"
    other.write_bytes(Signer.generate().public.pem())
    code, _, err = run_fedge("bundle", "--manifest", str(fleet_export), "--device", "rpi4",
                             "--broker", "mqtt://broker:1883", "--job", "j1", "--id", "pi-1",
                             "--trust", str(other), "--out", str(tmp_path / "b.tar.gz"))
    assert_one_line_error(code, err, 2, f"--trust {other} is key ",
                          f"but the bundle is signed with key {export_key.key_id}")
    assert list(tmp_path.iterdir()) == [other]


def test_every_file_the_credentials_name_travels(tmp_path):
    """Fields added to the credentials JSON later (a device key, a registry) are copied
    with no change to the bundler; one that points outside DIR is refused."""
    from toolkit.deploy.bundle import _credential_files
    from toolkit.errors import UsageError

    d = tmp_path / "sec"
    for rel in ("ca.crt", "certs/pi-1.crt", "certs/pi-1.key", "keys/pi-1.key", "trust.pub",
                "registry.json"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(rel)
    doc = {"username": "pi-1", "password": "registry.json", "cert": "certs/pi-1.crt",
           "key": "certs/pi-1.key", "ca": "ca.crt", "signing_key": "keys/pi-1.key",
           "trust": "trust.pub", "extra": {"future": {"chain": "certs/pi-1.crt"}}}
    creds = d / "credentials" / "pi-1.json"
    creds.parent.mkdir()
    creds.write_text(json.dumps(doc))
    assert sorted(_credential_files(creds)) == [
        "ca.crt", "certs/pi-1.crt", "certs/pi-1.key", "credentials/pi-1.json",
        "keys/pi-1.key", "trust.pub"]  # never the password, even when it names a file
    (tmp_path / "outside.txt").write_text("x")
    creds.write_text(json.dumps(dict(doc, registry="../outside.txt")))
    with pytest.raises(UsageError, match="field 'registry': ../outside.txt lies outside"):
        _credential_files(creds)

