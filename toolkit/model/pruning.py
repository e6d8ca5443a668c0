"""Structured channel pruning behind a small interface, with a replayable record.

torch-pruning does the analysis (its dependency graph couples every conv, BN
and linear that share a channel dimension), the scoring (group L2 magnitude)
and the editing. This module keeps the orchestration: prune to a ratio, search
the ratio that meets a MAC budget, and record what was removed as a JSON-able
``PruneRecord`` that ``replay`` applies to a fresh model of the same config, so
a pruned checkpoint rebuilds its exact shapes without pickle.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from toolkit.errors import ModelError
from toolkit.model.zoo import classifier_of


@dataclass
class PruneRecord:
    """What was pruned: torch-pruning's history, as (module name, output dim?, indices)."""

    ratio: float = 0.0
    steps: list[tuple[str, bool, list[int]]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"ratio": self.ratio, "steps": [[n, o, list(i)] for n, o, i in self.steps]}

    @classmethod
    def from_json(cls, d: dict) -> "PruneRecord":
        try:
            steps = [(str(n), bool(o), [int(i) for i in idx]) for n, o, idx in d["steps"]]
            return cls(float(d["ratio"]), steps)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"prune record is malformed: {e}") from None

    @property
    def empty(self) -> bool:
        return not self.steps


def count_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass on ``example``."""
    import torch_pruning as tp

    # Restore each module's own mode: a container's train() would flip shared
    # BatchNorm layers into training mode and let the next forward corrupt their stats.
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, example)
    except Exception as e:
        raise ModelError(f"cannot count MACs of {type(model).__name__}: "
                         f"{type(e).__name__}: {e}") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    return int(macs), int(params)


def _dependency_graph(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as e:
        raise ModelError(f"torch-pruning cannot trace {type(model).__name__}: "
                         f"{type(e).__name__}: {e}") from None


def prune(model: nn.Module, example: torch.Tensor, ratio: float) -> PruneRecord:
    """Remove ``ratio`` of the channels of every prunable group, in place.

    The classifier (last Linear) keeps its outputs. Raises ModelError when the
    model cannot be traced or has nothing to prune.
    """
    import torch_pruning as tp

    if not 0.0 <= ratio < 1.0:
        raise ModelError(f"prune ratio: expected in [0, 1), got {ratio}")
    if ratio == 0.0:
        return PruneRecord(0.0, [])
    head = classifier_of(model)
    model.eval()
    _dependency_graph(model, example)  # fail early with our message
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=[head] if head is not None else [])
        pruner.step()
    except Exception as e:
        raise ModelError(f"torch-pruning failed on {type(model).__name__}: "
                         f"{type(e).__name__}: {e}") from None
    steps = [(n, bool(o), [int(i) for i in idx]) for n, o, idx in pruner.pruning_history()]
    if not steps:
        raise ModelError(f"torch-pruning cannot trace a prunable channel group in "
                         f"{type(model).__name__} (does its forward leave autograd, e.g. "
                         "through numpy?)")
    return PruneRecord(ratio, steps)


def replay(model: nn.Module, record: PruneRecord, example: torch.Tensor) -> nn.Module:
    """Apply a recorded pruning to a fresh model of the same config, in place."""
    if record.empty:
        return model
    dg = _dependency_graph(model, example)
    try:
        dg.load_pruning_history([list(s) for s in record.steps])
    except Exception as e:
        raise ModelError(f"prune record does not fit this model: "
                         f"{type(e).__name__}: {e}") from None
    return model


def prune_to_macs(model: nn.Module, example: torch.Tensor, target_macs: int,
                  iters: int = 12) -> tuple[nn.Module, PruneRecord]:
    """A pruned copy with the largest MACs <= ``target_macs`` (bisection on the ratio).

    MACs fall roughly as (1 - ratio)^2, but the fixed input and classifier make
    it inexact, so the ratio is searched on copies of the model.
    """
    full, _ = count_macs(model, example)
    if target_macs >= full:
        return copy.deepcopy(model), PruneRecord()
    lo, hi = 0.0, 0.99
    best: tuple[nn.Module, PruneRecord] | None = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        cand = copy.deepcopy(model)
        rec = prune(cand, example, mid)
        macs, _ = count_macs(cand, example)
        if macs <= target_macs:
            best, hi = (cand, rec), mid
        else:
            lo = mid
    if best is None:
        cand = copy.deepcopy(model)
        best = (cand, prune(cand, example, hi))
    return best
