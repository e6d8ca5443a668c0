"""Small signed exports for the rollout tests: one tiny ONNX model per profile, made
with onnx's helper in milliseconds (no torch export), in ``fedge-manifest/2`` with a
version and a job, signed like ``fedge export`` signs. ``broken=True`` ships bytes
that pass the manifest's sha256 but that ONNX Runtime cannot load."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FEATURES, CLASSES = 40, 10


def tiny_model(seed: int, hidden: int = 0) -> bytes:
    """x (N, 40) float32 -> logits (N, 10): one Gemm with seeded weights; with
    ``hidden``, two hidden Gemms of that width before it (a much slower variant)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    widths = [FEATURES, *([hidden, hidden] if hidden else []), CLASSES]
    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        inits += [numpy_helper.from_array((rng.normal(size=(a, b)) / np.sqrt(a)).astype(
                      np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        out = "logits" if b == CLASSES else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out]))
        x = out
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def tiny_release(out: Path, job: str, version: int, key_path: Path,
                 profiles: tuple[str, ...] = ("rpi4", "rpi5"), seed: int = 0,
                 broken: bool = False, hidden: int = 0) -> Path:
    """Write and sign the export; returns its manifest.json."""
    from toolkit.deploy.signing import load_key, sign_manifest

    out.mkdir(parents=True, exist_ok=True)
    data = b"this is not an ONNX model" * 10 if broken else tiny_model(seed, hidden)
    devices = {}
    for p in profiles:
        rel = f"{p}/model.onnx"
        (out / p).mkdir(exist_ok=True)
        (out / rel).write_bytes(data)
        art = {"role": "full", "index": None, "precision": "fp32", "format": "onnx",
               "path": rel, "sha256": hashlib.sha256(data).hexdigest(), "opset": 13,
               "params": FEATURES * CLASSES + CLASSES, "macs": FEATURES * CLASSES,
               "inputs": [{"name": "x", "shape": ["N", FEATURES], "dtype": "float32"}],
               "outputs": [{"name": "logits", "shape": ["N", CLASSES], "dtype": "float32"}],
               "parity": {}}
        devices[p] = {"profile": {"name": p}, "plan": {}, "artifacts": [art]}
    manifest = out / "manifest.json"
    manifest.write_text(json.dumps({"format": "fedge-manifest/2", "version": version,
                                    "job": job, "model": {"arch": "tiny"},
                                    "devices": devices}, indent=1))
    sign_manifest(manifest, load_key(key_path))
    return manifest
