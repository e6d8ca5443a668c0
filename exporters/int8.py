"""fp32 ONNX -> int8 static QDQ ONNX, calibrated on real training samples.

Static quantization only: dynamic quantization leaves CNN activations in
float and gains little. Weights are int8, symmetric, per channel unless the
settings say per tensor; activations int8 (ONNX Runtime's S8S8 QDQ setting).
Which settings meet the parity bounds is ``exporters.int8_search``'s business;
this module makes one quantized file for one ``Int8Settings``.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from exporters.errors import ExportError
from exporters.onnx_fp32 import _quiet, onnx_opset, set_metadata

CALIBRATIONS = (CalibrationMethod.MinMax, CalibrationMethod.Percentile,
                CalibrationMethod.Entropy)
# The layers whose weights are quantized, and so the ones worth leaving in float
# when one of them loses too much (activations around them follow their consumers).
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Int8Settings:
    """One way to quantize: calibration, weight granularity, layers left in float."""

    method: CalibrationMethod = CalibrationMethod.MinMax
    per_channel: bool = True
    exclude: tuple[str, ...] = ()  # node names kept fp32
    only: tuple[str, ...] = ()  # if given, quantize just these nodes (sensitivity probes)

    def to_json(self) -> dict:
        return {"calibration": self.method.name, "per_channel": self.per_channel,
                "excluded": list(self.exclude)}


class _Batches(CalibrationDataReader):
    def __init__(self, name: str, x: np.ndarray, batch: int = 64):
        self._it = iter([{name: np.ascontiguousarray(x[i:i + batch], dtype=np.float32)}
                         for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._it, None)


def preprocess(fp32_path: str | Path, out_path: str | Path) -> Path:
    """ONNX Runtime's pre-quantization pass (shape inference, graph clean-up), once
    per model, however many settings are then tried on it."""
    try:
        with _quiet():
            quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    except Exception as e:
        raise ExportError(f"int8 pre-processing of {Path(fp32_path).name} failed: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
    return Path(out_path)


def weighted_nodes(model_path: str | Path) -> list[str]:
    """Names of the nodes with quantizable weights, in graph order."""
    return [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type in WEIGHTED_OPS]


def quantize_pre(pre_path: Path, out_path: Path, calib_x: np.ndarray,
                 settings: Int8Settings, opset: int,
                 metadata: dict[str, object] | None = None) -> Path:
    """Quantize an already pre-processed model with ``settings`` into ``out_path``."""
    name = onnx.load(str(pre_path)).graph.input[0].name
    try:
        with _quiet():
            quantize_static(str(pre_path), str(out_path), _Batches(name, calib_x),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, per_channel=settings.per_channel,
                            calibrate_method=settings.method,
                            nodes_to_exclude=list(settings.exclude),
                            nodes_to_quantize=list(settings.only) or None)
    except Exception as e:
        raise ExportError(f"int8 quantization of {pre_path.name} failed: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
    qmodel = onnx.load(str(out_path))
    if onnx_opset(qmodel) != opset:
        raise ExportError(f"{out_path.name}: quantizer changed opset {opset} to "
                          f"{onnx_opset(qmodel)}")
    set_metadata(qmodel, dict(metadata or {}, **{"fedge.calibration": settings.method.name}))
    onnx.save(qmodel, str(out_path))
    return out_path


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib_x: np.ndarray,
                  settings: Int8Settings = Int8Settings(),
                  metadata: dict[str, object] | None = None) -> Path:
    """``fp32_path`` quantized with ``settings`` into ``out_path``."""
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    opset = onnx_opset(onnx.load(str(fp32_path)))
    with tempfile.TemporaryDirectory() as tmp:
        pre = preprocess(fp32_path, Path(tmp) / "pre.onnx")
        return quantize_pre(pre, out_path, calib_x, settings, opset, metadata)
