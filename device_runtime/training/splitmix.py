"""SplitMix base networks: M narrow copies of one architecture, trained apart, averaged at
inference (docs/ALGORITHMS.md, section 1).

A SplitMix model is a ``ModelConfig`` with arch ``"splitmix"``: ``width`` is the atom
width r (times any global width), ``kwargs["base"]`` the zoo architecture of each base,
``kwargs["bases"]`` the number M, and, for the part a device trains,
``kwargs["indices"]`` the bases it holds. Base i's tensors are named ``bases.<i>.*``
everywhere (global model, device variant, update, checkpoint), so a device's update
lands on the right base without any renaming.

Three options of the authors' code (illidanlab/SplitMix), booleans in the kwargs
(``splitmix_variants.TRICKS``), all off by default: ``rescale_init`` draws each base's
initial weights as if it were full width, ``rescale_layer`` divides conv outputs by the
atom width while training, and ``batch_stats`` gives BatchNorm no running statistics,
so it normalises with each batch's own, at test too. fedge's default keeps tracked
running statistics: exported bases then answer each sample alone, whereas with
``batch_stats`` a prediction depends on the batch it arrives in.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from device_runtime.errors import ModelBuildError
from device_runtime.splitmix_variants import TRICKS
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
    indices, tricks = indices_of(cfg.kwargs), tricks_of(cfg.kwargs)
    atom = 1 / cfg.kwargs["bases"]
    return SplitMixNet({i: with_tricks(build_base(one), atom, tricks) for i in indices})


def tricks_of(cfg_kwargs: dict) -> set[str]:
    """The tricks a config turns on (each kwarg, when given, a bool)."""
    on = set()
    for name in TRICKS:
        value = cfg_kwargs.get(name, False)
        if not isinstance(value, bool):
            raise ModelBuildError(f"splitmix kwargs.{name}: expected true or false, got "
                                  f"{value!r}")
        if value:
            on.add(name)
    return on


def with_tricks(base: nn.Module, atom: float, tricks: set[str]) -> nn.Module:
    """``base`` (freshly built) with the tricks named in ``tricks``, in place."""
    layers = [m for m in base.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if "rescale_init" in tricks:
        # torch draws U(-b, b), b = 1/sqrt(fan_in), for weights and biases alike; the
        # authors redraw with fan_in / atom, which is the same draw times sqrt(atom).
        # The first layer's input (the raw sample) has no width: they leave it be.
        with torch.no_grad():
            for layer in layers[1:]:
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        p.mul_(math.sqrt(atom))
    if "rescale_layer" in tricks:
        for conv in _followed_by_norm(base):
            conv.register_forward_hook(TrainingScale(atom))
    if "batch_stats" in tricks:
        for bn in base.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                # as built with track_running_stats=False: no buffers, batch statistics
                bn.track_running_stats = False
                bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    return base


def _followed_by_norm(base: nn.Module) -> list[nn.Module]:
    """The conv and linear layers a BatchNorm directly follows. The authors scale every
    layer but the classifier, and in their nets a BatchNorm follows each one, which
    makes the training-only factor harmless at test; a layer with no BatchNorm after it
    (cnn-wide's hidden linear) would hand the next layer inputs 1/atom larger in
    training than at test, so it is left alone."""
    out = []
    for seq in base.modules():
        if isinstance(seq, nn.Sequential):
            kids = list(seq)
            out += [a for a, b in zip(kids, kids[1:])
                    if isinstance(a, (nn.Linear, nn.modules.conv._ConvNd))
                    and isinstance(b, nn.modules.batchnorm._BatchNorm)]
    return out


class TrainingScale:
    """Forward hook: the layer's output divided by ``width`` in training mode, untouched
    in eval mode (so exported graphs, traced in eval mode, do not hold it)."""

    def __init__(self, width: float):
        self.width = width

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor):
        return output / self.width if module.training else None

    def __repr__(self) -> str:
        return f"TrainingScale(1/{self.width:g})"


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
