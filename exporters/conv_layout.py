"""1-D convolutions exported as 2-D ones over a height of 1, the form ONNX Runtime runs
fastest.

ONNX Runtime's CPU provider runs a 1-D ``Conv`` as one small im2col GEMM per sample,
while a 2-D ``Conv`` goes through its NCHWc layout transformer (graph optimization
level ALL, x86) into kernels that work on the whole batch: the MNIST-1D CNN (640k
MACs a sample) took 2.05 ms at batch 64 with one thread as exported by torch against
1.48 ms in torch eager, and 1.02 ms in this form (docs/results/export.md, "conv
layout"). On Arm, without that transformer, both forms take the same im2col path.

``conv2d_form`` returns a copy of the module in which every plain ``nn.Conv1d``
(numeric padding, zero padding mode) is a ``Conv1dAs2d`` holding the same weights:
(N, C, L) -> unsqueeze -> Conv2d with kernel (1, k) -> squeeze. The maths is the
same, so the exported artifact is checked for parity against the original module.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class Conv1dAs2d(nn.Module):
    """``conv`` (an ``nn.Conv1d``) computed as a Conv2d over a height of 1."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]),
                              stride=(1, conv.stride[0]), padding=(0, conv.padding[0]),
                              dilation=(1, conv.dilation[0]), groups=conv.groups,
                              bias=conv.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight.unsqueeze(2))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.unsqueeze(2)).squeeze(2)


def _plain(conv: nn.Conv1d) -> bool:
    return not isinstance(conv.padding, str) and conv.padding_mode == "zeros"


def conv2d_form(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its plain Conv1d layers as ``Conv1dAs2d`` (the module
    itself if it has none)."""
    if not any(isinstance(m, nn.Conv1d) and _plain(m) for m in module.modules()):
        return module
    out = copy.deepcopy(module)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv1d) and _plain(child):
                setattr(parent, name, Conv1dAs2d(child))
    return out.eval() if not module.training else out
