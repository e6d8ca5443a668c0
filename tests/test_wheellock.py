"""The bundle's requirements.lock (toolkit/deploy/wheellock.py), made from the real wheelhouse
the bundle test installs from ($FEDGE_WHEELHOUSE)."""
from __future__ import annotations

import pytest

from tests.test_bundle import _wheelhouse


def test_the_lock_pins_what_a_device_installs_and_nothing_else(tmp_path):
    from device_runtime.manifest import sha256_file
    from toolkit.deploy.wheel import device_requirements
    from toolkit.deploy.wheellock import lock
    from toolkit.errors import UsageError

    wheels = _wheelhouse()
    text, n = lock(wheels, device_requirements())
    pins = dict(line.split(" ", 1) for line in text.splitlines())
    names = {p.split("==")[0] for p in pins}
    assert {"numpy", "onnxruntime", "paho-mqtt", "cryptography", "cffi"} <= names
    assert "tomli" not in names and len(pins) == n  # its marker is false on 3.11
    ort = next(w for w in wheels.glob("onnxruntime-*.whl"))
    assert f"--hash=sha256:{sha256_file(ort)}" in text
    partial = tmp_path / "wh"
    partial.mkdir()
    for w in wheels.glob("*.whl"):
        if not w.name.startswith("protobuf-"):
            (partial / w.name).symlink_to(w)
    with pytest.raises(UsageError, match="no wheel for protobuf, which onnxruntime requires"):
        lock(partial, device_requirements())
