"""Static analysis of a model: MACs and output shape of every stage.

Pure measurement, no decisions: the planner reads these numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from toolkit.model.pruning import count_macs
from toolkit.model.zoo import stages_of


@dataclass(frozen=True)
class StageInfo:
    index: int
    macs: int
    params: int
    out_shape: tuple[int, ...]  # one sample, batch dimension dropped

    @property
    def out_elems(self) -> int:
        n = 1
        for d in self.out_shape:
            n *= d
        return n


@torch.no_grad()
def stage_infos(model: nn.Module, example: torch.Tensor) -> list[StageInfo]:
    """MACs, params and output shape per stage; empty if the model has no stages."""
    stages = stages_of(model)
    if stages is None:
        return []
    model.eval()
    infos, x = [], example
    for i, stage in enumerate(stages):
        macs, params = count_macs(stage, x)
        x = stage(x)
        infos.append(StageInfo(i, macs, params, tuple(x.shape[1:])))
    return infos
