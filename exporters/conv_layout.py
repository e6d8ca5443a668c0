"""1-D convolutions exported as 2-D ones over a height of 1, the form ONNX Runtime runs
fastest.

ONNX Runtime's CPU provider runs a 1-D ``Conv`` as one small im2col GEMM per sample,
while a 2-D ``Conv`` goes through its NCHWc layout transformer (graph optimization
level ALL, x86) into kernels that work on the whole batch: the MNIST-1D CNN (640k
MACs a sample) took 2.05 ms at batch 64 with one thread as exported by torch against
1.48 ms in torch eager, and 0.89 ms in this form (BatchNorm folded, ReLU fused; the
export bench's rows: docs/results/export.md). On Arm, without that transformer, both
forms take the same im2col path.

``conv2d_form`` returns a copy of the module in which every plain ``nn.Conv1d``
(numeric padding, zero padding mode) is a ``Conv1dAs2d`` holding the same weights:
(N, C, L) -> unsqueeze -> Conv2d with kernel (1, k) -> squeeze. Inside an
``nn.Sequential``, a BatchNorm1d right after the conv is folded into it (as the
exporter folds it into a 1-D conv; a squeeze in between would keep it apart) and an
elementwise activation right after goes inside the wrapper, before the squeeze, where
ONNX Runtime fuses it with the conv. The maths is the same up to rounding, and the
exported artifact is checked for parity against the original module.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


# Elementwise, so they commute with the squeeze: taken inside the wrapper.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid,
               nn.Tanh)


class Conv1dAs2d(nn.Module):
    """``conv`` (an ``nn.Conv1d``) computed as a Conv2d over a height of 1, followed by
    ``act`` (an elementwise activation, or none)."""

    def __init__(self, conv: nn.Conv1d, act: nn.Module | None = None):
        super().__init__()
        self.act = act if act is not None else nn.Identity()
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]),
                              stride=(1, conv.stride[0]), padding=(0, conv.padding[0]),
                              dilation=(1, conv.dilation[0]), groups=conv.groups,
                              bias=conv.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight.unsqueeze(2))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x.unsqueeze(2))).squeeze(2)


def _plain(conv: nn.Conv1d) -> bool:
    return not isinstance(conv.padding, str) and conv.padding_mode == "zeros"


def conv2d_form(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (in eval mode) with its plain Conv1d layers as ``Conv1dAs2d``
    (the module itself if it has none)."""
    if not any(isinstance(m, nn.Conv1d) and _plain(m) for m in module.modules()):
        return module
    out = copy.deepcopy(module).eval()
    for parent in list(out.modules()):
        if isinstance(parent, nn.Sequential):
            _rewrite_sequence(parent)
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv1d) and _plain(child):
                setattr(parent, name, Conv1dAs2d(child))
    return out


def _rewrite_sequence(seq: nn.Sequential) -> None:
    """[Conv1d, BatchNorm1d?, activation?] runs of ``seq`` as one ``Conv1dAs2d``, the
    layers it absorbed left as ``nn.Identity`` (indices and state-dict names of the rest
    unchanged)."""
    names = list(seq._modules)
    i = 0
    while i < len(names):
        conv = seq._modules[names[i]]
        if not (isinstance(conv, nn.Conv1d) and _plain(conv)):
            i += 1
            continue
        j = i + 1
        nxt = seq._modules[names[j]] if j < len(names) else None
        if isinstance(nxt, nn.BatchNorm1d) and nxt.track_running_stats:
            conv = fuse_conv_bn_eval(conv, nxt)
            seq._modules[names[j]] = nn.Identity()
            j += 1
        nxt = seq._modules[names[j]] if j < len(names) else None
        act = None
        if isinstance(nxt, ACTIVATIONS):
            act = nxt
            seq._modules[names[j]] = nn.Identity()
            j += 1
        seq._modules[names[i]] = Conv1dAs2d(conv, act)
        i = j
