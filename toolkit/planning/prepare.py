"""Preparation: turn a checkpoint and a device plan into that device's torch model.

Prunes to the plan's MAC budget (optionally fine-tuning on the server's data),
measures the result and picks the split point on the pruned model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from toolkit.model.analysis import stage_infos
from toolkit.model.checkpoint import Checkpoint, example_input
from toolkit.model.pruning import PruneRecord, count_macs, prune_to_macs
from toolkit.model.train import TrainOptions, train
from toolkit.planning.plan import DevicePlan, choose_split, split_candidates
from toolkit.planning.profiles import DeviceProfile


@dataclass
class Variant:
    """One device's model, ready for export."""

    profile: DeviceProfile
    plan: DevicePlan
    model: nn.Module
    record: PruneRecord


def prepare_variant(ckpt: Checkpoint, profile: DeviceProfile, plan: DevicePlan,
                    finetune: TrainOptions | None = None,
                    data: tuple[np.ndarray, np.ndarray] | None = None,
                    split_after: int | None = None) -> Variant:
    example = example_input(ckpt.config)
    model, record = prune_to_macs(ckpt.model, example, plan.macs_budget)
    # A checkpoint may itself be pruned: the variant's record replays both.
    record = PruneRecord(record.ratio, ckpt.prune.steps + record.steps)
    if not record.empty and finetune is not None and data is not None:
        train(model, data[0], data[1], finetune)
    model.eval()
    plan.prune_ratio = round(record.ratio, 4)
    plan.macs, plan.params = count_macs(model, example)
    cands = split_candidates(stage_infos(model, example), profile)
    plan.split_candidates = cands
    plan.split = choose_split(cands, split_after)
    return Variant(profile, plan, model, record)
