"""ExecuTorch .pte programs for mobile profiles: lowered to XNNPACK, run in ExecuTorch's
own runtime against torch, listed in the manifest (format "pte"), never picked by the
ONNX Runtime predictor. Skipped where the optional executorch extra is not installed."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("executorch", reason="the optional `executorch` extra is not installed")

pytestmark = pytest.mark.slow  # lowering takes tens of seconds per program


def test_mobile_variant_gets_checked_pte_programs(trained_ckpt, mnist1d, tmp_path):
    from device_runtime.manifest import load_manifest
    from device_runtime.predictor import Predictor
    from exporters.executorch_pte import run_pte
    from exporters.variant import ParityData, Part, VariantRequest, export_variant, write_manifest
    from toolkit.model import checkpoint

    model = checkpoint.load(trained_ckpt).model.eval()
    data = ParityData(mnist1d.x_train[:256], mnist1d.x_test, mnist1d.y_test)
    req = VariantRequest("phone", [Part("full", model, 1, 1)], 17, mobile=True, pte=True)
    write_manifest(tmp_path, {}, {"phone": {"artifacts": export_variant(req, data, tmp_path)}})
    entry = load_manifest(tmp_path).device("phone")
    pte = {a.precision: a for a in entry.artifacts if a.format == "pte"}
    assert "fp32" in pte and pte["fp32"].parity["max_abs_err"] <= 1e-4
    if "int8" in pte:
        assert pte["int8"].parity["top1_agreement"] >= 0.99
    else:
        assert "ExecuTorch int8" in pte["fp32"].int8_fallback["reason"]
    import torch

    with torch.no_grad():
        ref = model(torch.from_numpy(mnist1d.x_test[:20])).numpy()
    out = run_pte(tmp_path / pte["fp32"].path, mnist1d.x_test[:20])
    assert np.max(np.abs(out - ref)) <= 1e-4
    pred = Predictor.from_manifest(tmp_path, "phone", "fp32")
    assert pred.artifact.format == "onnx"  # ONNX Runtime never gets a .pte
