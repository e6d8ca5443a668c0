"""ONNX Runtime sessions: open an artifact and run it in batches (no torch)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def open_session(path: str | Path, threads: int = 0,
                 providers: list[str] | None = None) -> ort.InferenceSession:
    """A session on ``path``; ``threads`` = 0 lets ONNX Runtime choose."""
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so,
                                providers=providers or ["CPUExecutionProvider"])


def run(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The first output for ``x``, computed in batches."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: np.ascontiguousarray(x[i:i + batch_size])})[0]
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)
