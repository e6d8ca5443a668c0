"""The ORT predictor and ``fedge infer``: accuracy, input checks, verification, no torch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_runtime.errors import (
    EXIT_DATA,
    ArtifactVerificationError,
    BudgetError,
    InputArrayError,
    ManifestError,
)
from device_runtime.predictor import Predictor
from testkit.timing import scaled
from tests.conftest import ROOT, assert_one_line_error, run_fedge

DEVICE = "jetson-orin-nano"

# Any attempt to import torch leaves a marker file and fails, so a command that
# swallows the ImportError is still caught.
BLOCK_TORCH = """
import os, sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            with open(os.environ["FEDGE_TORCH_MARKER"], "a") as f:
                f.write(name + "\\n")
            raise ImportError("torch is not installed on this device")
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture(scope="module")
def predictor(fleet_export) -> Predictor:
    return Predictor.from_manifest(fleet_export, DEVICE)


def test_fp32_accuracy_and_attributes(predictor, mnist1d):
    labels = predictor.predict(mnist1d.x_test)
    assert labels.dtype == np.int64 and labels.shape == (len(mnist1d.x_test),)
    assert (labels == mnist1d.y_test).mean() >= 0.94
    assert predictor.artifact.role == "full" and predictor.artifact.precision == "fp32"
    assert predictor.artifact.format == "onnx"
    assert predictor.entry.name == DEVICE and predictor.entry.plan["profile"] == DEVICE
    assert predictor.sample_shape == tuple(mnist1d.sample_shape)


def test_int8_works(fleet_export, mnist1d):
    p = Predictor.from_manifest(fleet_export, DEVICE, precision="int8", threads=1)
    assert p.artifact.path.endswith("full.int8.onnx")
    logits = p.predict_logits(mnist1d.x_test)
    assert logits.dtype == np.float32 and logits.shape == (len(mnist1d.x_test), 10)
    assert (logits.argmax(1) == mnist1d.y_test).mean() >= 0.93


def test_mobile_prefers_onnx_then_falls_back_to_ort(fleet_export, tmp_path, mnist1d):
    assert Predictor.from_manifest(fleet_export, "android-mid").artifact.format == "onnx"
    root = tmp_path / "fleet"
    shutil.copytree(fleet_export.parent, root)
    data = json.loads((root / "manifest.json").read_text())
    arts = data["devices"]["android-mid"]["artifacts"]
    data["devices"]["android-mid"]["artifacts"] = [a for a in arts if a["format"] == "ort"]
    (root / "manifest.json").write_text(json.dumps(data))
    p = Predictor.from_manifest(root, "android-mid")
    assert p.artifact.format == "ort" and p.artifact.path.endswith("full.fp32.ort")
    assert (p.predict(mnist1d.x_test) == mnist1d.y_test).mean() >= 0.9


def test_single_sample_and_dtypes(predictor, mnist1d):
    x = mnist1d.x_test
    one = predictor.predict(x[0])
    assert one.shape == (1,) and one[0] == predictor.predict(x[:1])[0]
    np.testing.assert_allclose(predictor.predict_logits(x[:8].astype(np.float64)),
                               predictor.predict_logits(x[:8]), rtol=1e-5, atol=1e-5)
    ints = np.round(x[:8] * 10).astype(np.int32)
    np.testing.assert_allclose(predictor.predict_logits(ints),
                               predictor.predict_logits(ints.astype(np.float32)))
    assert predictor.predict(list(x[0])).shape == (1,)


def test_batches_match_one_run(fleet_export, predictor, mnist1d):
    small = Predictor.from_manifest(fleet_export, DEVICE, batch_size=7)
    np.testing.assert_allclose(small.predict_logits(mnist1d.x_test[:50]),
                               predictor.predict_logits(mnist1d.x_test[:50]),
                               rtol=1e-5, atol=1e-5)


def test_a_small_run_gives_the_same_predictions(fleet_export, mnist1d):
    """One thread and no graph rewrites: the same labels, logits equal to float
    rounding (the unrewritten graph adds in another order)."""
    import onnxruntime as ort

    one = Predictor.from_manifest(fleet_export, DEVICE, samples=1)
    two = Predictor.from_manifest(fleet_export, DEVICE, threads=2)
    opts = one.sessions[0].get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert two.sessions[0].get_session_options().intra_op_num_threads == 2
    for x in (mnist1d.x_test[:1], mnist1d.x_test):
        np.testing.assert_allclose(one.predict_logits(x), two.predict_logits(x),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(one.predict(x), two.predict(x))


def _with_nan(x):
    x = x[:4].copy()
    x[2, 5] = np.nan
    return x


@pytest.mark.parametrize("make, needles", [
    (lambda x: np.zeros((3, 41), np.float32), ["input shape", "expected (N, 40)", "got (3, 41)"]),
    (lambda x: np.zeros((2, 1, 40), np.float32), ["input shape", "got (2, 1, 40)"]),
    (lambda x: np.zeros((41,), np.float32), ["input shape", "got (41,)"]),
    (lambda x: np.zeros((0, 40), np.float32), ["at least one sample", "got (0, 40)"]),
    (_with_nan, ["expected finite", "1 NaN/inf", "(2, 5)"]),
    (lambda x: np.full((2, 40), 1e300), ["expected finite", "80 NaN/inf"]),
    (lambda x: np.array([["a"] * 40]), ["input dtype", "numeric", "got <U1"]),
    (lambda x: x[:2].astype(object), ["input dtype", "got object"]),
    (lambda x: x[:2] > 0, ["input dtype", "got bool"]),
], ids=["width", "ndim", "one-sample", "empty", "nan", "overflow", "strings", "object",
        "bool"])
def test_bad_inputs_are_refused_naming_the_problem(predictor, mnist1d, make, needles):
    with pytest.raises(InputArrayError) as e:
        predictor.predict(make(mnist1d.x_test))
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_unknown_device_and_precision(fleet_export):
    with pytest.raises(ManifestError, match="no device 'nope'.*jetson-orin-nano"):
        Predictor.from_manifest(fleet_export, "nope")
    with pytest.raises(ManifestError, match="precision: expected one of fp32, int8, got 'fp16'"):
        Predictor.from_manifest(fleet_export, DEVICE, precision="fp16")
    with pytest.raises(ManifestError, match="does not exist"):
        Predictor.from_manifest(fleet_export.parent / "missing.json", DEVICE)


def test_set_budget_bases(predictor, mnist1d):
    before = predictor.predict_logits(mnist1d.x_test[:5])
    predictor.set_budget(bases=1)
    assert predictor.active == 1
    np.testing.assert_array_equal(predictor.predict_logits(mnist1d.x_test[:5]), before)
    for bad in (0, 2, True, 1.0):
        with pytest.raises(BudgetError, match=r"bases: expected an int in 1\.\.1"):
            predictor.set_budget(bases=bad)
    assert predictor.active == 1


def test_tampered_artifact_is_refused_before_loading(fleet_export, tmp_path, monkeypatch):
    root = tmp_path / "fleet"
    shutil.copytree(fleet_export.parent, root)
    target = root / DEVICE / "full.fp32.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    opened = []
    monkeypatch.setattr("device_runtime.predictor.open_session",
                        lambda *a, **k: opened.append(a))
    with pytest.raises(ArtifactVerificationError, match=f"{DEVICE}/full.fp32.onnx fails "
                       "its sha256 check"):
        Predictor.from_manifest(root / "manifest.json", DEVICE)
    assert opened == []


def test_the_session_is_built_from_the_bytes_that_were_hashed(fleet_export, predictor,
                                                              tmp_path, monkeypatch, mnist1d):
    """An artifact swapped for another model after its sha256 check and before ONNX
    Runtime reads it: the session must still be the verified model."""
    import device_runtime.predictor as mod
    from device_runtime.session import open_session

    root = tmp_path / "fleet"
    shutil.copytree(fleet_export.parent, root)
    target = root / DEVICE / "full.fp32.onnx"
    other = (root / "rpi3b" / "full.fp32.onnx").read_bytes()  # a different, valid model
    x = mnist1d.x_test[:200]
    swapped = Predictor.from_manifest(fleet_export, "rpi3b").predict_logits(x)

    def swap_then_open(model, *args, **kwargs):
        target.write_bytes(other)  # the attacker wins the race between hash and load
        return open_session(model, *args, **kwargs)
    monkeypatch.setattr(mod, "open_session", swap_then_open)
    p = Predictor.from_manifest(root / "manifest.json", DEVICE, threads=1)
    assert target.read_bytes() == other  # the swap happened
    assert not np.allclose(swapped, predictor.predict_logits(x), atol=1e-3)
    np.testing.assert_allclose(p.predict_logits(x), predictor.predict_logits(x),
                               rtol=1e-5, atol=1e-5)


def _run_without_torch(tmp_path: Path, *args: str):
    """``python -m toolkit ARGS`` with torch unimportable; also returns torch attempts."""
    site = tmp_path / "block_torch"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_TORCH)
    marker = tmp_path / "torch_imports.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]),
               FEDGE_TORCH_MARKER=str(marker))
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=scaled(300))
    tried = marker.read_text() if marker.exists() else ""
    return p, tried


def test_torch_blocker_really_blocks(tmp_path):
    p, tried = _run_without_torch(tmp_path, "-c", "import torch")
    assert p.returncode != 0 and "torch is not installed" in p.stderr
    assert tried.split() == ["torch"]


def test_infer_cli_without_torch(fleet_export, export_key, predictor, mnist1d, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, mnist1d.x_test)
    common = ["-m", "toolkit", "infer", "--manifest", str(fleet_export), "--device", DEVICE,
              "--input", str(x), "--trust", str(export_key.public_path)]

    p, tried = _run_without_torch(tmp_path, *common, "--output", str(tmp_path / "y.npy"))
    assert p.returncode == 0, p.stderr
    # the summary with --output too: the execution provider really used, the signature
    assert "CPUExecutionProvider" in p.stdout and "manifest signature verified" in p.stdout
    labels = np.load(tmp_path / "y.npy")
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, predictor.predict(mnist1d.x_test))
    assert (labels == mnist1d.y_test).mean() >= 0.94

    p, tried_logits = _run_without_torch(tmp_path, *common, "--logits",
                                         "--output", str(tmp_path / "out" / "logits"))
    assert p.returncode == 0, p.stderr
    logits = np.load(tmp_path / "out" / "logits")  # written as named, no ".npy" appended
    assert logits.dtype == np.float32 and logits.shape == (len(mnist1d.x_test), 10)
    np.testing.assert_allclose(logits, predictor.predict_logits(mnist1d.x_test),
                               rtol=1e-5, atol=1e-5)

    p, tried_summary = _run_without_torch(tmp_path, *common, "--precision", "int8")
    assert p.returncode == 0, p.stderr
    assert f"{len(mnist1d.x_test)} samples" in p.stdout and "ms per sample" in p.stdout
    assert "labels 0:" in p.stdout
    assert tried == tried_logits == tried_summary == "", "fedge infer imported torch"


def _bad_npy(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.npy"
    if kind == "shape":
        np.save(path, np.zeros((3, 41), np.float32))
    elif kind == "nan":
        np.save(path, np.full((2, 40), np.nan, np.float32))
    elif kind == "strings":
        np.save(path, np.array([["a"] * 40]))
    elif kind == "object":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif kind == "text":
        path.write_text("not an array\n")
    elif kind == "truncated":
        np.save(path, np.zeros((100, 40), np.float32))
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "npz":
        path = tmp_path / "arrays.npz"
        np.savez(path, x=np.zeros((2, 40), np.float32))
    return path


@pytest.mark.parametrize("kind, needle", [
    ("shape", "input shape: expected (N, 40) or one sample (40,), got (3, 41)"),
    ("nan", "expected finite"),
    ("strings", "input dtype"),
    ("object", "object array"),
    ("text", "not a .npy array (no .npy header)"),
    ("truncated", "not a readable .npy array"),
    ("npz", "got a .npz archive"),
    ("missing", "no such file"),
])
def test_infer_cli_bad_input_is_one_line(fleet_export, export_key, tmp_path, kind, needle):
    path = _bad_npy(tmp_path, kind)
    code, out, err = run_fedge("infer", "--manifest", str(fleet_export), "--device", DEVICE,
                               "--input", str(path), "--trust", str(export_key.public_path))
    needles = [needle] if kind in ("shape", "nan", "strings") else [path.name, needle]
    assert_one_line_error(code, err, EXIT_DATA, "fedge infer: error:", *needles)
