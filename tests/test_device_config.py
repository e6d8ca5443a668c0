"""A device's config file (device.toml, as a bundle ships it): paths relative to the
file, the command line over the file, --check verifying the signed export, and bad
configs as one-line errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_one_line_error, run_fedge


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc" / "device.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_device_config_relative_paths_and_command_line_wins(tmp_path, fleet_export,
                                                            export_key):
    """What a bundle's device.toml gives: paths relative to the file, options from the
    command line over the file's, and --check verifying the signed export."""
    import numpy as np

    from device_runtime.keys import Signer

    shutil.copytree(fleet_export.parent, tmp_path / "etc" / "artifacts")
    shutil.copy(export_key.public_path, tmp_path / "etc" / "trust.pub")
    Signer.generate().save(tmp_path / "etc" / "pi-1.key")  # the device's own signing key
    np.savez(tmp_path / "local.npz", x=np.zeros((7, 40), np.float32), y=np.zeros(7, np.int64))
    cfg = _config(tmp_path, 'broker = "mqtt://broker:1883"\njob = "j1"\nid = "pi-1"\n'
                  'profile = "rpi4"\ndata = "../local.npz"\nmanifest = '
                  '"artifacts/manifest.json"\ntrust = "trust.pub"\nkey = "pi-1.key"\n')
    code, out, err = run_fedge("device", "--config", str(cfg), "--check", cwd=ROOT.parent)
    assert code == 0, err
    assert out.startswith("device pi-1: ok (rpi4, broker mqtt://broker:1883")
    assert f"(key {export_key.key_id})" in out and "7 samples" in out
    code, out, _ = run_fedge("device", "--config", str(cfg), "--id", "pi-2",
                             "--data", str(tmp_path / "none.npz"), "--check")
    assert code == 0 and out.startswith("device pi-2: ok") and "no data yet at" in out
    (tmp_path / "etc" / "artifacts" / "manifest.json.sig").unlink()  # an unsigned export
    code, _, err = run_fedge("device", "--config", str(cfg), "--check")
    assert_one_line_error(code, err, 6, "manifest.json.sig is missing")


@pytest.mark.parametrize("text, needle", [
    ('brokr = "mqtt://b:1883"\n', "unknown key 'brokr'; valid keys: broker, job"),
    ('broker = "mqtt://b:1883"\nthreads = "two"\n', "threads: expected int, got 'two'"),
    ('broker = "mqtt://b:1883\n', "is not TOML"),
    ('broker = "mqtt://b:1883"\n', "missing --job, --id, --profile, --data"),
])
def test_bad_device_configs_are_one_line(tmp_path, text, needle):
    code, _, err = run_fedge("device", "--config", str(_config(tmp_path, text)))
    assert_one_line_error(code, err, 2, needle)
