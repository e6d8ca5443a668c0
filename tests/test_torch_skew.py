"""A device's torch may be another version than the server's (PyPI's aarch64 CPU torch
stops at 2.10.0; the server trains with 2.13.0). What makes that safe: the wire carries
float32 tensors named and shaped by the server's model, and the device refuses, naming
both sides, a model whose state dict differs. tests/test_arm64.py runs the two versions
against each other; this checks the refusal and the wheelhouse's choice of torch."""
from __future__ import annotations

import pytest
import torch

from device_runtime.errors import ModelBuildError
from device_runtime.training.local import load_weights, weights_of
from device_runtime.training.models import ModelConfig, build_model
from toolkit.deploy import wheelhouse
from toolkit.errors import UsageError


def _model():
    return build_model(ModelConfig(arch="cnn1d", input_shape=(40,), num_classes=10))


def test_a_renamed_state_dict_entry_is_refused_naming_it_and_the_torch_version():
    model = _model()
    w = weights_of(model)
    key = next(k for k in w if k.endswith("running_mean"))
    w[key.replace("running_mean", "running_avg")] = w.pop(key)  # another torch's name
    with pytest.raises(ModelBuildError) as e:
        load_weights(model, w)
    msg = str(e.value)
    assert f"torch {torch.__version__}" in msg and key in msg and "running_avg" in msg


def test_the_wire_holds_float32_only_whatever_the_model_keeps():
    model = _model().double()  # a torch whose default dtype differed
    assert {v.dtype.name for v in weights_of(model).values()} == {"float32"}


def test_aarch64_targets_take_pypis_cpu_torch_and_x86_the_cpu_index(tmp_path):
    rpi = wheelhouse.pip_commands(wheelhouse.target("rpi-bookworm"), tmp_path, torch=True)
    assert rpi[1][-1] == "torch==2.10.0" and "--index-url" not in rpi[1]
    host = wheelhouse.pip_commands(wheelhouse.target("host"), tmp_path, torch=True)
    assert host[1][-1] == wheelhouse.TORCH and wheelhouse.TORCH_INDEX in host[1]
    with pytest.raises(UsageError, match="jetson-nano-legacy: --torch: no torch wheel on "
                                         "PyPI runs on glibc 2.27"):
        wheelhouse.pip_commands(wheelhouse.target("jetson-nano-legacy"), tmp_path, torch=True)


def test_a_wheelhouse_with_cuda_packages_is_named_as_such(tmp_path):
    for name in ("torch-2.13.0-cp311-cp311-manylinux_2_28_aarch64.whl",
                 "nvidia_cudnn_cu13-9.20.0.48-py3-none-manylinux_2_27_aarch64.whl",
                 "triton-3.7.1-cp311-cp311-manylinux_2_27_aarch64.whl",
                 "numpy-2.4.6-cp311-cp311-manylinux_2_28_aarch64.whl"):
        (tmp_path / name).write_bytes(b"")
    assert wheelhouse.cuda_wheels(tmp_path) == [
        "nvidia_cudnn_cu13-9.20.0.48-py3-none-manylinux_2_27_aarch64.whl",
        "triton-3.7.1-cp311-cp311-manylinux_2_27_aarch64.whl"]
