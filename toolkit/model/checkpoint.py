"""Checkpoints: safetensors weights with the model config and prune record inside.

No pickle: tensors go through safetensors, everything else is JSON in the
file's metadata, so ``load`` rebuilds the model from the config, replays the
pruning record to get the exact shapes, then loads the weights strictly. The file
is data: its config may name a custom factory only if the caller's allowlist
(``LocalModels``, from ``--allow-custom-model``) holds it, checked before any import.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from device_runtime.errors import ModelNotAllowedError
from device_runtime.local_models import NO_CUSTOM, LocalModels
from toolkit.errors import CheckpointError, FedgeError
from toolkit.model.datasets import DatasetSpec
from toolkit.model.pruning import PruneRecord, replay
from toolkit.model.zoo import ModelConfig, build_model

FORMAT = "fedge-checkpoint/1"


@dataclass
class Checkpoint:
    """A model with everything needed to rebuild and re-export it."""

    config: ModelConfig
    model: nn.Module
    prune: PruneRecord = field(default_factory=PruneRecord)
    dataset: DatasetSpec | None = None
    metrics: dict = field(default_factory=dict)


def example_input(cfg: ModelConfig, batch: int = 1) -> torch.Tensor:
    return torch.zeros((batch, *cfg.input_shape), dtype=torch.float32)


def save(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write atomically (temp file, fsync, rename), so a crash never leaves half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "config": json.dumps(ckpt.config.to_json()),
        "prune": json.dumps(ckpt.prune.to_json()),
        "dataset": json.dumps(ckpt.dataset.to_json() if ckpt.dataset else None),
        "metrics": json.dumps(ckpt.metrics),
    }
    tensors = {k: v.detach().contiguous().clone() for k, v in ckpt.model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | Path, allowed: LocalModels = NO_CUSTOM) -> Checkpoint:
    """Read a checkpoint; every failure is a CheckpointError naming the file, but a
    custom model ``allowed`` does not name (ModelNotAllowedError, exit 5)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad bytes
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fedge checkpoint: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format is {meta.get('format')!r}, "
                              f"expected {FORMAT!r}")
    try:
        cfg = ModelConfig.from_json(json.loads(meta["config"]))
        record = PruneRecord.from_json(json.loads(meta["prune"]))
        ds = json.loads(meta.get("dataset", "null"))
        dataset = DatasetSpec(**ds) if ds else None
        metrics = json.loads(meta.get("metrics", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError, FedgeError) as e:
        raise CheckpointError(f"checkpoint {path}: metadata is malformed: {e}") from None
    try:
        allowed.check(cfg.arch, cfg.factory, cfg.kwargs)
    except ModelNotAllowedError as e:
        raise ModelNotAllowedError(f"checkpoint {path}: {e}") from None
    try:
        model = build_model(cfg, allowed)
        replay(model, record, example_input(cfg))
        model.load_state_dict(tensors, strict=True)
    except (FedgeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path}: weights do not match its config: "
                              f"{first}") from None
    model.eval()
    return Checkpoint(cfg, model, record, dataset, metrics)
