"""An int8 copy that no setting brings within its parity bounds: the fp32 artifact ships
in its place with the reason and the measured agreement in the manifest, a one-line
warning says so, the predictor serves int8 requests with it, and --strict-int8 keeps
the old failure."""
from __future__ import annotations

import json

import numpy as np
import pytest

from device_runtime.errors import ManifestError
from device_runtime.manifest import load_manifest
from device_runtime.predictor import Predictor
from exporters.errors import ParityError
from tests.conftest import assert_one_line_error, run_fedge
from tests.user_models import Int8Hostile

HOSTILE = "tests.user_models:int8_hostile"


def _request(ckpt_path, mnist1d, strict=False):
    import torch

    from exporters.variant import ParityData, Part, VariantRequest
    from toolkit.model import checkpoint

    torch.manual_seed(0)
    good = checkpoint.load(ckpt_path).model
    bad = Int8Hostile(mnist1d.sample_shape, 10)
    parts = [Part("base", good, 1, 1, index=0), Part("base", bad, 1, 1, index=1)]
    data = ParityData(mnist1d.x_train[:256], mnist1d.x_test, mnist1d.y_test)
    return VariantRequest("dev", parts, 17, strict_int8=strict), data


@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory, trained_ckpt, mnist1d):
    """Base 0 (the trained cnn) passes int8; base 1 (Int8Hostile) cannot."""
    from exporters.variant import export_variant, write_manifest

    root = tmp_path_factory.mktemp("mixed")
    req, data = _request(trained_ckpt, mnist1d)
    write_manifest(root, {}, {"dev": {"artifacts": export_variant(req, data, root)}})
    return root


def test_hostile_base_falls_back_with_reason_and_agreement(mixed_export):
    doc = json.loads((mixed_export / "manifest.json").read_text())
    arts = {a["path"]: a for a in doc["devices"]["dev"]["artifacts"]}
    assert "dev/base0.int8.onnx" in arts and "dev/base1.int8.onnx" not in arts
    assert not (mixed_export / "dev" / "base1.int8.onnx").exists()
    fb = arts["dev/base1.fp32.onnx"]["int8_fallback"]
    assert "int8 parity not met" in fb["reason"] and "top-1 agreement" in fb["reason"]
    assert 0 <= fb["top1_agreement"] < 0.99 and fb["tried"] >= 6
    assert "int8_fallback" not in arts["dev/base0.fp32.onnx"]
    assert arts["dev/base0.int8.onnx"]["parity"]["top1_agreement"] >= 0.99


def test_predictor_serves_int8_with_the_fallback_and_fp32_as_asked(mixed_export, mnist1d):
    q = Predictor.from_manifest(mixed_export, "dev", "int8")
    assert [a.path for a in q.artifacts] == ["dev/base0.int8.onnx", "dev/base1.fp32.onnx"]
    assert [a.path for a in q.fallbacks] == ["dev/base1.fp32.onnx"]
    f = Predictor.from_manifest(mixed_export, "dev", "fp32")
    assert [a.path for a in f.artifacts] == ["dev/base0.fp32.onnx", "dev/base1.fp32.onnx"]
    assert f.fallbacks == []
    f.set_budget(bases=1)
    q.set_budget(bases=1)
    agree = np.mean(f.predict(mnist1d.x_test) == q.predict(mnist1d.x_test))
    assert agree >= 0.99


def test_strict_int8_fails_naming_the_artifact(trained_ckpt, mnist1d, tmp_path):
    from exporters.variant import export_variant

    req, data = _request(trained_ckpt, mnist1d, strict=True)
    with pytest.raises(ParityError, match=r"dev/base1.int8.onnx fails int8 parity with every "
                                          r"setting tried \(\d+\): top-1 agreement"):
        export_variant(req, data, tmp_path)


def test_int8_fallback_on_an_int8_artifact_is_refused(mixed_export, tmp_path):
    doc = json.loads((mixed_export / "manifest.json").read_text())
    for a in doc["devices"]["dev"]["artifacts"]:
        if a["precision"] == "int8":
            a["int8_fallback"] = {"reason": "x"}
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"int8_fallback: expected an object on an fp32"):
        load_manifest(tmp_path)


@pytest.mark.slow  # four fedge processes: pretrain, two exports, infer
def test_cli_export_falls_back_with_one_warning_and_strict_fails_one_line(tmp_path):
    ck = tmp_path / "h.safetensors"
    code, _, err = run_fedge("pretrain", "--dataset", "mnist1d", "--model", HOSTILE,
                             "--epochs", "1", "--out", str(ck))
    assert code == 0, err
    args = ("export", "--checkpoint", str(ck), "--profiles", "jetson-orin-nano",
            "--allow-custom-model", HOSTILE, "--finetune-epochs", "0")
    strict = tmp_path / "strict"
    code, _, err = run_fedge(*args, "--strict-int8", "--out", str(strict))
    assert_one_line_error(code, err, 6, "jetson-orin-nano/full.int8.onnx fails int8 parity")
    assert not strict.exists()
    out = tmp_path / "out"
    code, stdout, err = run_fedge(*args, "--out", str(out))
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "full.fp32.onnx ships in the int8 slot" in warnings[0]
    entry = load_manifest(out).device("jetson-orin-nano")
    assert [a.precision for a in entry.artifacts] == ["fp32"]
    assert entry.artifacts[0].int8_fallback["top1_agreement"] < 0.99
    assert "int8 fp32" in stdout  # the summary line says the int8 slot holds fp32
    sample = tmp_path / "one.npy"
    np.save(sample, np.zeros((1, 40), np.float32))
    code, stdout, err = run_fedge("infer", "--manifest", str(out), "--device",
                                  "jetson-orin-nano", "--input", str(sample), "--no-verify",
                                  "--precision", "int8")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: 1 of 1 models run fp32"), err
    assert "full.fp32.onnx" in stdout


def test_settings_the_quantizer_fails_on_are_failed_attempts_not_a_failed_export(
        tmp_path, trained_ckpt, mnist1d, monkeypatch):
    """ONNX Runtime's histogram calibrations raise on some pruned variants' activations
    (a FedMRN-trained cnn pruned 56% for rpi3b: "setting an array element with a
    sequence"); the search goes on with the other settings, and if every one raises the
    artifact ships fp32 with the quantizer's error as the reason."""
    import torch

    from exporters import int8_search
    from exporters.errors import ExportError
    from exporters.onnx_fp32 import export_fp32
    from exporters.parity import ParityBounds
    from toolkit.model import checkpoint

    model = checkpoint.load(trained_ckpt).model
    fp32 = export_fp32(model, torch.from_numpy(mnist1d.x_test[:2]), tmp_path / "m.onnx", 17,
                       "x", "logits", {})
    real = int8_search.quantize_pre

    def flaky(pre, out, calib, settings, opset, metadata=None):
        if settings.per_channel or fail_all:  # the first settings tried raise
            raise ExportError("int8 quantization of pre.onnx failed: ValueError: boom")
        return real(pre, out, calib, settings, opset, metadata)

    monkeypatch.setattr(int8_search, "quantize_pre", flaky)
    evaluate = lambda p: {"top1_agreement": 1.0, "accuracy": 0.9,  # noqa: E731
                          "reference_accuracy": 0.9}
    fail_all = False
    ok = int8_search.search_int8(fp32, tmp_path / "q.onnx", mnist1d.x_train[:64], evaluate,
                                 ParityBounds())
    assert ok.why is None and not ok.settings.per_channel and ok.tried > 1
    fail_all = True
    bad = int8_search.search_int8(fp32, tmp_path / "q2.onnx", mnist1d.x_train[:64], evaluate,
                                  ParityBounds(), opts=int8_search.Int8Search(0.1))
    assert bad.settings is None and "the quantizer failed" in bad.why and "boom" in bad.why
    assert not (tmp_path / "q2.onnx").exists()
