"""1-D convolutions are exported as 2-D ones over a height of 1 (ONNX Runtime runs
that form 2x faster at batch 64 on x86, docs/results/export.md), with the same
outputs as the torch module."""
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from device_runtime.training.models import ModelConfig, build_model
from exporters.conv_layout import conv2d_form
from exporters.onnx_fp32 import export_fp32


def _run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _conv_weight_ranks(path) -> list[int]:
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return [inits[n.input[1]].ndim for n in m.graph.node if n.op_type == "Conv"]


def test_the_mnist1d_cnn_exports_2d_convs_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig("cnn1d", (40,), 10)).eval()
    x = torch.randn(64, 40)
    path = export_fp32(model, x[:2], tmp_path / "m.onnx", 17, "x", "y", {})
    assert _conv_weight_ranks(path) == [4, 4, 4, 4]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in ops  # folded into the convs, as for a 1-D conv
    assert ops.count("Relu") == 4 and ops.index("Relu") == ops.index("Conv") + 1
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(_run(path, x.numpy()), want, atol=1e-4, rtol=1e-4)
    assert all(isinstance(m, nn.Conv1d) for m in model.modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d)))  # the original is untouched


def test_convs_it_cannot_rewrite_stay_1d_and_still_match(tmp_path):
    model = nn.Sequential(nn.Unflatten(1, (1, 40)),
                          nn.Conv1d(1, 4, 3, padding="same"),  # string padding: kept
                          nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"),  # kept
                          nn.Conv1d(4, 4, 3, stride=2, dilation=2, groups=2, bias=True),
                          nn.Flatten()).eval()
    rewritten = conv2d_form(model)
    kinds = [type(m).__name__ for m in rewritten if not isinstance(m, (nn.Unflatten,
                                                                       nn.Flatten))]
    assert kinds == ["Conv1d", "Conv1d", "Conv1dAs2d"]
    x = torch.randn(8, 40)
    path = export_fp32(model, x[:2], tmp_path / "m.onnx", 17, "x", "y", {})
    with torch.no_grad():
        np.testing.assert_allclose(rewritten(x).numpy(), model(x).numpy(), atol=1e-6)
        np.testing.assert_allclose(_run(path, x.numpy()), model(x).numpy(), atol=1e-5)
