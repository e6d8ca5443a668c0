"""fp32 ONNX -> int8 static QDQ ONNX, calibrated on real training samples.

Static quantization only: dynamic quantization leaves CNN activations in
float and gains little. Weights are per-channel symmetric int8, activations
int8 (ONNX Runtime's recommended S8S8 QDQ setting). Calibration methods are
tried in order until one meets the parity bounds; the caller checks parity.
"""
from __future__ import annotations

import tempfile
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


class _Batches(CalibrationDataReader):
    def __init__(self, name: str, x: np.ndarray, batch: int = 64):
        self._it = iter([{name: np.ascontiguousarray(x[i:i + batch], dtype=np.float32)}
                         for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._it, None)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib_x: np.ndarray,
                  method: CalibrationMethod = CalibrationMethod.MinMax,
                  metadata: dict[str, object] | None = None) -> Path:
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    model = onnx.load(str(fp32_path))
    name = model.graph.input[0].name
    opset = onnx_opset(model)
    try:
        with tempfile.TemporaryDirectory() as tmp, _quiet():
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(out_path), _Batches(name, calib_x),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=method)
    except Exception as e:
        raise ExportError(f"int8 quantization of {fp32_path.name} failed: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
    qmodel = onnx.load(str(out_path))
    if onnx_opset(qmodel) != opset:
        raise ExportError(f"{out_path.name}: quantizer changed opset {opset} to "
                          f"{onnx_opset(qmodel)}")
    set_metadata(qmodel, dict(metadata or {}, **{"fedge.calibration": method.name}))
    onnx.save(qmodel, str(out_path))
    return out_path
