"""SplitMix base networks: M narrow copies of one architecture, trained apart, averaged at
inference (docs/ALGORITHMS.md, section 1).

A SplitMix model is a ``ModelConfig`` with arch ``"splitmix"``: ``width`` is the atom
width r (times any global width), ``kwargs["base"]`` the zoo architecture of each base,
``kwargs["bases"]`` the number M, and, for the part a device trains,
``kwargs["indices"]`` the bases it holds. Base i's tensors are named ``bases.<i>.*``
everywhere (global model, device variant, update, checkpoint), so a device's update
lands on the right base without any renaming.

BatchNorm keeps tracked running statistics (fedge's choice; the paper uses batch
statistics at test time): exported ONNX bases then run one sample at a time.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from device_runtime.errors import ModelBuildError
from device_runtime.training.local import (
    LocalResult,
    LocalTrainOptions,
    minibatches,
    weights_of,
)


class SplitMixNet(nn.Module):
    """Some of the M bases; ``forward`` averages their logits (the width-k model)."""

    def __init__(self, bases: dict[int, nn.Module]):
        super().__init__()
        if not bases:
            raise ModelBuildError("splitmix: a model needs at least one base")
        self.bases = nn.ModuleDict({str(i): m for i, m in sorted(bases.items())})

    @property
    def indices(self) -> list[int]:
        return [int(k) for k in self.bases]

    def forward(self, x: torch.Tensor, per_base: bool = False) -> torch.Tensor:
        """The mean of the bases' logits; ``per_base``: all of them, stacked (k, N, C)."""
        outs = torch.stack([m(x) for m in self.bases.values()])
        return outs if per_base else outs.mean(0)

    def first(self, k: int) -> "SplitMixNet":
        """The width-k model: the first ``k`` bases (shares their modules)."""
        keep = self.indices[:k]
        return SplitMixNet({i: self.bases[str(i)] for i in keep})


def indices_of(cfg_kwargs: dict) -> list[int]:
    m = cfg_kwargs.get("bases")
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ModelBuildError(f"splitmix kwargs.bases: expected an int >= 1, got {m!r}")
    idx = cfg_kwargs.get("indices", list(range(m)))
    if not isinstance(idx, list) or not idx or \
            any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < m for i in idx) \
            or len(set(idx)) != len(idx):
        raise ModelBuildError(f"splitmix kwargs.indices: expected distinct ints in 0..{m - 1}, "
                              f"got {idx!r}")
    return sorted(idx)


def build_splitmix(cfg, archs, build_base) -> SplitMixNet:
    """The bases ``cfg`` names, each built by ``build_base`` as ``kwargs["base"]`` (one
    of ``archs``) at width ``cfg.width``. (models.build_model passes its own: this
    module does not import it back.)"""
    base = cfg.kwargs.get("base")
    if base not in archs:
        raise ModelBuildError(f"splitmix kwargs.base: expected one of {', '.join(archs)}, "
                              f"got {base!r}")
    one = cfg.replace(arch=base, kwargs={})
    return SplitMixNet({i: build_base(one) for i in indices_of(cfg.kwargs)})


def supervised_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, call=None
                    ) -> tuple[torch.Tensor, float]:
    """(loss to minimize, mean loss per model). Cross-entropy; for SplitMix bases the sum
    of each base's own, so every base learns alone, as the paper trains them (training
    the averaged logits would make the bases co-adapt, and the first k would no longer
    stand on their own). ``call`` replaces ``model(...)`` (e.g. a functional call)."""
    call = call or model
    if isinstance(model, SplitMixNet):
        outs = call(x, per_base=True)
        loss = sum(nn.functional.cross_entropy(o, y) for o in outs)
        return loss, float(loss.detach()) / len(outs)
    loss = nn.functional.cross_entropy(call(x), y)
    return loss, float(loss.detach())


def train_bases(model: SplitMixNet, x: np.ndarray, y: np.ndarray,
                opts: LocalTrainOptions) -> LocalResult:
    """Each minibatch goes through every held base; their losses are summed (so each
    base gets its own gradient) and one SGD step updates them all."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(opts.seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum,
                          weight_decay=opts.weight_decay)
    model.train()
    total, seen = 0.0, 0
    for _ in range(max(1, opts.epochs)):
        for idx in minibatches(len(xt), opts.batch_size, gen):
            loss, mean = supervised_loss(model, xt[idx], yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += mean * len(idx)
            seen += len(idx)
    model.eval()
    return LocalResult(weights_of(model), len(x), total / max(seen, 1),
                       time.perf_counter() - t0)
