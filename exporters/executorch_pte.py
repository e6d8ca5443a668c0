"""torch module -> ExecuTorch ``.pte`` (XNNPACK delegate), fp32 and int8, for phones.

ExecuTorch is an optional server-side extra (``pip install fedge[executorch]``;
docs/models.md gives the versions measured against the torch pin). Without it
``available()`` is False and mobile profiles get their ONNX and ORT-format
artifacts only. int8 is PT2E static quantization with the XNNPACK quantizer
(symmetric, per-channel weights), calibrated on the same training samples as the
ONNX int8 copy. Parity is measured in ExecuTorch's own runtime
(``executorch.runtime``), one batch at a time, against the torch module.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exporters.errors import ExportError

MAX_BATCH = 256  # the largest batch the exported program takes (dynamic up to this)


def available() -> bool:
    """Whether the executorch package (and its XNNPACK backend) is installed."""
    return importlib.util.find_spec("executorch") is not None


def _program(module: nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if not isinstance(module, torch.fx.GraphModule):  # a converted PT2E graph has no eval()
        module.eval()
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def _quantized(module: nn.Module, example: torch.Tensor, calib_x: np.ndarray) -> nn.Module:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(_program(module, example).module(), quantizer)
    with torch.no_grad():
        for i in range(0, len(calib_x), 64):
            prepared(torch.from_numpy(np.ascontiguousarray(calib_x[i:i + 64])))
    return convert_pt2e(prepared)


def export_pte(module: nn.Module, example: torch.Tensor, path: str | Path,
               calib_x: np.ndarray | None = None) -> Path:
    """Lower ``module`` (int8 if ``calib_x`` is given) to an XNNPACK ``.pte`` at ``path``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    path = Path(path)
    try:
        src = _quantized(module, example, calib_x) if calib_x is not None else module
        program = to_edge_transform_and_lower(
            _program(src, example), partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as e:  # torch.export and the lowering raise many unrelated types
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"ExecuTorch export of {path.name} failed: {type(e).__name__}: "
                          f"{why}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(program.buffer)
    return path


def run_pte(path: str | Path, x: np.ndarray) -> np.ndarray:
    """The program's first output for ``x``, computed in ExecuTorch's runtime."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")
    # The program's memory plan bounds the batch (the lowering may tighten MAX_BATCH).
    cap = max(1, int(method.metadata.input_tensor_meta(0).sizes()[0]))
    outs = [method.execute([torch.from_numpy(np.ascontiguousarray(x[i:i + cap]))])[0]
            for i in range(0, len(x), cap)]
    return torch.cat(outs).detach().numpy()
