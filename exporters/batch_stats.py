"""BatchNorm without running statistics (SplitMix's ``batch_stats``) written out as the
reductions it computes, so that both ONNX exporters can write it.

Such a layer normalises with the statistics of the batch it is given, in eval mode too.
The dynamo exporter (opset 18 and up) writes that, but the TorchScript one (below 18,
e.g. Jetson Nano's ORT 1.10) refuses it with a dynamic batch axis ("batch_size and
channel_size must be non-None"). ``explicit_batch_stats`` returns a copy in which each
such layer is a ``BatchStatsNorm`` holding the same affine parameters; tracked
BatchNorm layers are left to the exporter, which folds them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class BatchStatsNorm(nn.Module):
    """(x - batch mean) / sqrt(batch variance + eps), per channel, then the affine map:
    what ``F.batch_norm`` computes in training mode, without updating anything."""

    def __init__(self, bn: _BatchNorm):
        super().__init__()
        self.eps = bn.eps
        self.weight, self.bias = bn.weight, bn.bias  # None when not affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)  # biased, as BatchNorm's
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is None:
            return y
        shape = [1, -1] + [1] * (x.dim() - 2)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


def _untracked(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) and m.running_mean is None


def explicit_batch_stats(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with each BatchNorm that has no running statistics as a
    ``BatchStatsNorm`` (the module itself if it has none)."""
    if not any(_untracked(m) for m in module.modules()):
        return module
    out = copy.deepcopy(module)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if _untracked(child):
                setattr(parent, name, BatchStatsNorm(child))
    return out
