"""ONNX -> ORT format (``.ort``), for ONNX Runtime Mobile on phones.

Only basic (platform-independent) graph optimizations are applied, so the file
runs on any ORT build; hardware-specific fusions happen on the device.
"""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from exporters.errors import ExportError


def convert_to_ort(onnx_path: str | Path, out_path: str | Path) -> Path:
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(out_path)
    so.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"ORT-format conversion of {onnx_path.name} failed: {e}") from None
    if not out_path.is_file():
        raise ExportError(f"ORT-format conversion of {onnx_path.name} wrote nothing")
    return out_path
