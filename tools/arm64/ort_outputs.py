"""Run ONNX artifacts in this machine's ONNX Runtime and write their outputs as .npy.

The same script runs on the x86 host and inside the arm64 root (with the device
venv's python: numpy and onnxruntime only, no fedge import), so the two sides of
the cross-architecture parity check differ only by architecture.

    python ort_outputs.py JOBS.json

JOBS.json: [{"model": PATH, "input": PATH.npy, "output": PATH.npy}, ...]. Inputs are
read with allow_pickle=False; the first output of each model is written. One
thread per session: the figures compare kernels, not thread schedules.
"""
from __future__ import annotations

import json
import platform
import sys

import numpy as np
import onnxruntime as ort


def run(model: str, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if isinstance(inp.shape[0], int):  # a fixed batch: one sample at a time
        return np.concatenate([sess.run(None, {inp.name: x[i:i + 1]})[0]
                               for i in range(len(x))])
    return sess.run(None, {inp.name: x})[0]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: ort_outputs.py JOBS.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        jobs = json.load(f)
    for job in jobs:
        x = np.load(job["input"], allow_pickle=False)
        np.save(job["output"], run(job["model"], x), allow_pickle=False)
    print(f"{len(jobs)} models on {platform.machine()}, onnxruntime {ort.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
