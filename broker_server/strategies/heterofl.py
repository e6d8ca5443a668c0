"""HeteroFL-style nested widths: a device trains the global model's first channels.

The baseline SplitMix and REFT are compared against (docs/ALGORITHMS.md, sections 1
and 3). A device with width budget R trains the zoo model at width w (the
largest level <= R); its tensors are the leading block of every global tensor
(the first ``ceil(w * C)`` channels of each layer, the first hidden units), so a
flatten keeps its prefix too, because it is channel-major and width does not change
the spatial size. Each global entry is averaged, weighted by samples, over the
devices whose block holds it; an entry nobody trained keeps its value. The maths
is ``nested_slice`` and ``NestedSum``.

The widths' shapes and model configs come from the toolkit
(``toolkit.strategies.server.heterofl.heterofl_options``), which builds each width once; the service
stays torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from broker_server.strategies.base import Assignment, DeviceInfo, Strategy, Update, Weights
from broker_server.strategies.folds import Fold
from device_runtime.codecs import CodecContext


@dataclass(frozen=True)
class HeteroFLOptions:
    # "width" (e.g. "0.25") -> {"model": ModelConfig JSON, "tensors": {name: shape}};
    # empty: ``toolkit.strategies.server.heterofl.heterofl_options`` fills them in from the budgets.
    levels: dict = field(default_factory=dict)
    width_by_profile: dict = field(default_factory=dict)  # profile -> width budget in (0, 1]
    widths: dict = field(default_factory=dict)  # device id -> width budget
    default_width: float = 1.0

    def level_of(self, device: str, profile: str) -> str:
        """The largest level that fits the device's width budget (at least the smallest)."""
        budget = float(self.widths.get(device) or self.width_by_profile.get(profile)
                       or self.default_width)
        ordered = sorted(self.levels, key=float)
        fitting = [w for w in ordered if float(w) <= budget + 1e-9]
        return fitting[-1] if fitting else ordered[0]

    def check(self) -> None:
        if not self.levels:
            raise ValueError("levels: expected at least one width, got none")
        for w, level in self.levels.items():
            if not 0 < _number(w) <= 1:
                raise ValueError(f"levels[{w!r}]: expected a width in (0, 1]")
            if not isinstance(level, dict) or set(level) != {"model", "tensors"}:
                raise ValueError(f"levels[{w!r}]: expected {{'model', 'tensors'}}, got "
                                 f"{sorted(level) if isinstance(level, dict) else level!r}")
        for where, table in (("width_by_profile", self.width_by_profile),
                             ("widths", self.widths)):
            for key, b in table.items():
                if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0 < b <= 1:
                    raise ValueError(f"{where}[{key!r}]: expected a width in (0, 1], got {b!r}")


def _number(w: str) -> float:
    try:
        return float(w)
    except (TypeError, ValueError):
        return -1.0


def variant_of(width: str) -> str:
    return f"width-{width}"


def nested_slice(weights: Weights, shapes: dict) -> Weights:
    """The leading block of each tensor, of the shape ``shapes`` names."""
    out = {}
    for k, shape in shapes.items():
        t = weights[k]
        if len(shape) != t.ndim or any(s > n for s, n in zip(shape, t.shape)):
            raise ValueError(f"nested_slice: {k} of shape {tuple(shape)} is not a block of "
                             f"{t.shape}")
        out[k] = np.array(t[tuple(slice(0, s) for s in shape)], order="C")  # 0-d stays 0-d
    return out


class NestedSum:
    """Per-entry sample-weighted sums of nested blocks; untouched entries keep the global."""

    def __init__(self, global_weights: Weights):
        self.weights = global_weights
        self.sums: dict[str, np.ndarray] = {}
        self.mass: dict[str, np.ndarray] = {}

    def add(self, w: Weights, n: float) -> None:
        for k, v in w.items():
            if k not in self.sums:
                self.sums[k] = np.zeros(self.weights[k].shape, np.float64)
                self.mass[k] = np.zeros(self.weights[k].shape, np.float64)
            block = tuple(slice(0, s) for s in v.shape)
            self.sums[k][block] += v.astype(np.float64, copy=False) * n
            self.mass[k][block] += n

    def result(self) -> Weights:
        out = dict(self.weights)
        for k, s in self.sums.items():
            m = self.mass[k]
            out[k] = np.where(m > 0, s / np.maximum(m, 1e-300), self.weights[k]).astype(
                np.float32)
        return out


def nested_average(global_weights: Weights, updates: list[tuple[Weights, float]]) -> Weights:
    acc = NestedSum(global_weights)
    for w, n in updates:
        acc.add(w, n)
    return acc.result()


class HeteroFL(Strategy):
    name = "heterofl"

    def __init__(self, epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
                 options: HeteroFLOptions | None = None):
        if not isinstance(options, HeteroFLOptions):
            raise ValueError("heterofl: options must be a HeteroFLOptions (the widths' shapes "
                             "and configs; toolkit.strategies.server.heterofl.heterofl_options "
                             "builds them)")
        options.check()
        self.opts, self.epochs, self.batch_size, self.lr = options, epochs, batch_size, lr
        self.by_variant = {variant_of(w): level for w, level in options.levels.items()}

    def variants(self, global_weights: Weights) -> dict[str, Weights]:
        return {}  # published on demand: only the widths this round's devices train

    def variant(self, global_weights: Weights, name: str) -> Weights:
        if name not in self.by_variant:
            raise ValueError(f"variant: heterofl has no variant {name!r}; valid: "
                             f"{', '.join(sorted(self.by_variant))}")
        return nested_slice(global_weights, self.by_variant[name]["tensors"])

    def assign(self, round_: int, devices: list[DeviceInfo]) -> dict[str, Assignment]:
        out = {}
        for d in devices:
            name = variant_of(self.opts.level_of(d.id, d.profile))
            out[d.id] = Assignment(name, self.epochs, self.batch_size, self.lr,
                                   model=self.by_variant[name]["model"])
        return out

    def fold(self, round_: int, global_weights: Weights, codec, ctx):
        return NestedMeanFold(self, global_weights, codec, ctx)

    def aggregate(self, round_: int, global_weights: Weights, updates: list[Update]) -> Weights:
        return nested_average(global_weights, [(u.weights, float(u.samples)) for u in updates])


class NestedMeanFold(Fold):
    """Decodes each update against its own block of the global model, then sums it."""

    def __init__(self, strategy: HeteroFL, global_weights: Weights, codec, ctx: CodecContext):
        self.strategy, self.weights, self.codec, self.ctx = strategy, global_weights, codec, ctx
        self.sums = NestedSum(global_weights)

    def add(self, device: str, samples: int, tensors: Weights, params: dict,
            variant: str = "full") -> None:
        ref = self.strategy.variant(self.weights, variant)
        w = self.codec.decode(tensors, params, CodecContext(self.ctx.round, self.ctx.seed, ref,
                                                            device))
        self.sums.add(w, float(samples))

    def result(self) -> Weights:
        return self.sums.result()


__all__ = ["HeteroFL", "HeteroFLOptions", "NestedSum", "nested_average", "nested_slice",
           "variant_of"]
