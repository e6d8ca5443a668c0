"""torch module -> single-file fp32 ONNX with a dynamic batch axis, opset capped.

Opset 18 and up go through the dynamo exporter; below 18 (Jetson Nano's ORT
1.10 loads at most opset 15) only the legacy TorchScript exporter writes a
native graph, so it is used there.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from exporters.batch_stats import explicit_batch_stats
from exporters.conv_layout import conv2d_form
from exporters.errors import ExportError

DYNAMO_MIN_OPSET = 18


def export_fp32(module: nn.Module, example: torch.Tensor, path: str | Path, opset: int,
                input_name: str, output_name: str, metadata: dict[str, object]) -> Path:
    """Write ``module`` as ONNX at ``opset`` exactly; metadata goes into metadata_props."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    module = conv2d_form(explicit_batch_stats(module))  # ONNX Runtime's faster 1-D conv
    if example.shape[0] < 2:  # a batch of 1 would be specialised away
        example = example.expand(2, *example.shape[1:]).contiguous()
    try:
        with _quiet():
            if opset >= DYNAMO_MIN_OPSET:
                torch.onnx.export(module, (example,), str(path), dynamo=True,
                                  opset_version=opset, input_names=[input_name],
                                  output_names=[output_name], external_data=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},),
                                  verbose=False)
            else:
                torch.onnx.export(module, (example,), str(path), dynamo=False,
                                  opset_version=opset, input_names=[input_name],
                                  output_names=[output_name],
                                  dynamic_axes={input_name: {0: "batch"},
                                                output_name: {0: "batch"}})
    except Exception as e:
        raise ExportError(f"ONNX export of {path.name} failed: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
    model = onnx.load(str(path))
    got = onnx_opset(model)
    if got != opset:
        raise ExportError(f"{path.name}: exporter wrote opset {got}, the profile needs {opset}")
    set_metadata(model, metadata)
    onnx.save(model, str(path))
    return path


def onnx_opset(model: onnx.ModelProto) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def set_metadata(model: onnx.ModelProto, metadata: dict[str, object]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if key in existing:
            existing[key].value = text
        else:
            model.metadata_props.add(key=key, value=text)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation notes; keep the CLI clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
