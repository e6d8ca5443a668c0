"""ONNX Runtime execution providers: the preference order, the FEDGE_ORT_PROVIDERS
override, the fallback when a GPU provider cannot create a session, and what is reported."""
from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from device_runtime.errors import ProviderError
from device_runtime.manifest import load_manifest
from device_runtime.session import choose_providers, open_session, provider_of
from tests.conftest import assert_one_line_error, run_fedge
from toolkit.cli.main import main

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
JETSON = [CPU, "AzureExecutionProvider", CUDA, TRT]  # what a Jetson build reports


def test_preference_is_tensorrt_then_cuda_then_cpu_among_those_available():
    assert choose_providers(JETSON) == [TRT, CUDA, CPU]
    assert choose_providers([CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers(["AzureExecutionProvider", CPU]) == [CPU]
    assert choose_providers(JETSON, ["cuda", "CPU", CUDA]) == [CUDA, CPU]
    with pytest.raises(ProviderError, match=r"'TensorRT' is not available; onnxruntime "
                       r"\S+ has: CUDAExecutionProvider, CPUExecutionProvider"):
        choose_providers([CUDA, CPU], ["TensorRT"])


@pytest.fixture
def fake_gpu(monkeypatch):
    """This onnxruntime claims TensorRT and CUDA; creating a session with either first
    fails like a Jetson missing libnvinfer. Returns the provider lists tried."""
    real = ort.InferenceSession
    tried = []

    def session(model, so=None, providers=None):
        tried.append(list(providers))
        if providers[0] != CPU:
            raise RuntimeError(f"{providers[0]}: libnvinfer.so.8: cannot open shared object")
        return real(model, so, providers=providers)
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(JETSON))
    monkeypatch.setattr(ort, "InferenceSession", session)
    return tried


def test_gpu_failure_falls_back_to_cpu_and_infer_reports_it(fleet_export, export_key, fake_gpu,
                                                            tmp_path, mnist1d, capsys, caplog):
    x = tmp_path / "x.npy"
    np.save(x, mnist1d.x_test[:20])
    caplog.set_level(logging.WARNING, logger="fedge.session")
    assert main(["infer", "--manifest", str(fleet_export), "--device", "rpi4",
                 "--input", str(x), "--trust", str(export_key.public_path)]) == 0
    assert "20 samples on rpi4 (rpi4/full.fp32.onnx, CPUExecutionProvider)" in \
        capsys.readouterr().out
    assert fake_gpu == [[TRT, CUDA, CPU], [CUDA, CPU], [CPU]]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "falling back to CPUExecutionProvider" in warnings[1]


def test_env_override_decides_the_order(fleet_export, fake_gpu, monkeypatch):
    path = load_manifest(fleet_export).device("rpi4").find().path
    monkeypatch.setenv("FEDGE_ORT_PROVIDERS", "cpu")
    assert provider_of(open_session(fleet_export.parent / path)) == CPU
    assert fake_gpu == [[CPU]]  # TensorRT and CUDA were never tried


def test_an_unavailable_provider_is_a_one_line_error(fleet_export, export_key, tmp_path,
                                                     mnist1d):
    x = tmp_path / "x.npy"
    np.save(x, mnist1d.x_test[:5])
    code, _, err = run_fedge("infer", "--manifest", str(fleet_export), "--device", "rpi4",
                             "--input", str(x), "--trust", str(export_key.public_path),
                             env={"FEDGE_ORT_PROVIDERS": "NoSuchProvider"})
    assert_one_line_error(code, err, 2, "FEDGE_ORT_PROVIDERS='NoSuchProvider'",
                          "'NoSuchProvider' is not available", "CPUExecutionProvider")
