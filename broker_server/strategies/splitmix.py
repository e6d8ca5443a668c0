"""SplitMix: M narrow base networks; each device trains as many as its budget affords.

docs/ALGORITHMS.md, section 1. A device with width budget R trains n = floor(R / r)
bases (at least 1, at most M): the first from a global shuffled cyclic sampler
(fedge: one fixed order, so every base is trained within any ceil(M / devices) rounds;
the paper: reshuffled after each cycle), the others drawn at random without repeats.
It uploads only those bases, through any codec; the server averages each base over
the devices that trained it, weighted by samples, and a base nobody trained keeps its
weights. The maths is ``average_bases``. The width tricks and batch statistics
(``SplitMixOptions.paper()``) act in the model (device_runtime/training/splitmix.py),
through the config kwargs ``model_kwargs`` gives.

Budgets come from ``SplitMixOptions.budgets`` (per device), else
``budget_by_profile``, else ``default_budget``;
``toolkit.strategies.server.splitmix.budgets_from_profiles`` derives them from compute and memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from broker_server.strategies.aggregate import PartialSum
from broker_server.strategies.base import Assignment, DeviceInfo, Strategy, Update, Weights
from broker_server.strategies.folds import Fold
from device_runtime.codecs import CodecContext
from device_runtime.splitmix_variants import TRICKS, parse_variant, variant_name

SAMPLINGS = ("cyclic", "reshuffle")


@dataclass(frozen=True)
class SplitMixOptions:
    atom: float = 0.125  # base width r: M = 1 / r bases
    budgets: dict = field(default_factory=dict)  # device id -> width budget in (0, 1]
    budget_by_profile: dict = field(default_factory=dict)
    default_budget: float = 1.0
    # The authors' tricks (docs/ALGORITHMS.md, section 1), all off in fedge's defaults:
    rescale_init: bool = False  # init each base as if full width: fan-in / atom
    rescale_layer: bool = False  # conv outputs / atom while training
    batch_stats: bool = False  # BatchNorm on each batch's statistics, at test too
    base_sampling: str = "cyclic"  # first base per device: one fixed order, or "reshuffle"

    @classmethod
    def paper(cls) -> "SplitMixOptions":
        """The authors' code (illidanlab/SplitMix): ``--rescale_init`` and
        ``--rescale_layer`` default true, every published run has ``--no_track_stat``,
        and the base sampler reshuffles once each cycle is handed out."""
        return cls(rescale_init=True, rescale_layer=True, batch_stats=True,
                   base_sampling="reshuffle")

    def model_kwargs(self) -> dict:
        """The tricks that are on, for the bases' model config (off ones are left out,
        so a default config is what it always was)."""
        return {name: True for name in TRICKS if getattr(self, name)}

    @property
    def bases(self) -> int:
        return int(round(1 / self.atom))

    def budget_of(self, device: str, profile: str) -> float:
        return float(self.budgets.get(device) or self.budget_by_profile.get(profile)
                     or self.default_budget)

    def bases_of(self, device: str, profile: str) -> int:
        return bases_for(self.budget_of(device, profile), self.atom)

    def check(self) -> None:
        m = 1 / self.atom if self.atom > 0 else 0
        if not 0 < self.atom <= 1 or abs(m - round(m)) > 1e-6:
            raise ValueError(f"atom: expected 1/M for a whole number M (e.g. 0.125), "
                             f"got {self.atom}")
        for where, table in (("budgets", self.budgets),
                             ("budget_by_profile", self.budget_by_profile),
                             ("default_budget", {"": self.default_budget})):
            for key, b in table.items():
                if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0 < b <= 1:
                    name = f"{where}[{key!r}]" if key else where
                    raise ValueError(f"{name}: expected a width budget in (0, 1], got {b!r}")
        self._check_tricks()

    def _check_tricks(self) -> None:
        for name in TRICKS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.base_sampling not in SAMPLINGS:
            raise ValueError(f"base_sampling: expected one of {', '.join(SAMPLINGS)}, got "
                             f"{self.base_sampling!r}")
        if self.rescale_layer and not self.batch_stats:
            # BatchNorm would track statistics of outputs 1/atom too large, then meet the
            # unscaled ones at test; the authors' runs all use batch statistics.
            raise ValueError("rescale_layer: expected False unless batch_stats is True "
                             "(running statistics would be kept at the training-only "
                             "1/atom scale), got True")


def bases_for(budget: float, atom: float) -> int:
    """n = floor(budget / atom), at least 1 and at most 1 / atom."""
    m = int(round(1 / atom))
    return max(1, min(m, math.floor(budget / atom + 1e-9)))


class CyclicSampler:
    """The bases in a shuffled order, handed out cyclically.

    The authors' sampler (``shuffle_sampler``) reshuffles once all bases are handed
    out (``reshuffle=True``): each aligned run of M picks holds every base, but a
    window that straddles two cycles can miss one. fedge keeps one fixed order, so
    any M consecutive picks hold every base and n devices a round train all M within
    ceil(M / n) rounds; the device order is shuffled each round instead
    (``SplitMix.assign``), so no device is tied to a base. Cycle c's order is seeded
    by (seed, M, c), so the position alone restores the sampler.
    """

    def __init__(self, m: int, seed: int = 0, reshuffle: bool = False):
        self.m, self.seed, self.pos, self.reshuffle = m, seed, 0, reshuffle
        self.order = np.random.default_rng([seed, m]).permutation(m)

    def order_of(self, cycle: int) -> np.ndarray:
        """The order of the ``cycle``-th run of M picks (the first one's, unless
        reshuffling)."""
        if cycle and self.reshuffle:
            return np.random.default_rng([self.seed, self.m, cycle]).permutation(self.m)
        return self.order

    def next(self) -> int:
        cycle, at = divmod(self.pos, self.m)
        self.pos += 1
        return int(self.order_of(cycle)[at])

    def state(self) -> dict:
        return {"pos": self.pos}

    def load(self, d: dict) -> None:
        self.pos = int(d.get("pos", 0))


def choose_bases(first: int, n: int, m: int, rng: np.random.Generator) -> list[int]:
    """``first`` plus n - 1 other bases drawn without repeats."""
    others = [i for i in range(m) if i != first]
    return sorted([first, *rng.choice(others, size=n - 1, replace=False).tolist()])


def base_of(name: str) -> int | None:
    """``bases.3.stages.0.1.weight`` -> 3."""
    parts = name.split(".", 2)
    return int(parts[1]) if len(parts) > 2 and parts[0] == "bases" and parts[1].isdigit() \
        else None


def subset(weights: Weights, indices: list[int]) -> Weights:
    keep = set(indices)
    return {k: v for k, v in weights.items() if base_of(k) in keep}


def average_bases(global_weights: Weights, updates: list[tuple[Weights, float]]) -> Weights:
    """Each tensor: the sample-weighted mean over the updates that hold it; a tensor
    no update holds (a base nobody trained) keeps its global value."""
    sums = PartialSumByTensor()
    for w, n in updates:
        sums.add(w, n)
    return sums.result(global_weights)


class PartialSumByTensor:
    """Sample-weighted sums kept per tensor, since each update holds only some bases."""

    def __init__(self):
        self.parts: dict[str, PartialSum] = {}

    def add(self, w: Weights, n: float) -> None:
        for k, v in w.items():
            self.parts.setdefault(k, PartialSum()).add({k: v}, n)

    def result(self, global_weights: Weights) -> Weights:
        out = dict(global_weights)
        for k, part in self.parts.items():
            out[k] = part.mean()[k]
        return out


class SplitMix(Strategy):
    name = "splitmix"

    def __init__(self, epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
                 options: SplitMixOptions | None = None, seed: int = 0):
        self.opts = options or SplitMixOptions()
        self.opts.check()
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.m, self.seed = self.opts.bases, seed
        self.sampler = CyclicSampler(self.m, seed, self.opts.base_sampling == "reshuffle")

    def variants(self, global_weights: Weights) -> dict[str, Weights]:
        return {}  # published on demand, once the round's assignment names them

    def variant(self, global_weights: Weights, name: str) -> Weights:
        return subset(global_weights, parse_variant(name))

    def assign(self, round_: int, devices: list[DeviceInfo]) -> dict[str, Assignment]:
        out = {}
        order = sorted(devices, key=lambda d: d.id)
        np.random.default_rng([self.seed, round_]).shuffle(order)
        for d in order:
            n = self.opts.bases_of(d.id, d.profile)
            rng = np.random.default_rng([self.seed, round_, *d.id.encode()])
            bases = choose_bases(self.sampler.next(), n, self.m, rng)
            out[d.id] = Assignment(variant_name(bases), self.epochs, self.batch_size, self.lr)
        return out

    def fold(self, round_: int, global_weights: Weights, codec, ctx):
        return BaseMeanFold(self, global_weights, codec, ctx)

    def aggregate(self, round_: int, global_weights: Weights, updates: list[Update]) -> Weights:
        return average_bases(global_weights, [(u.weights, float(u.samples)) for u in updates])

    def state(self) -> dict:
        return {"sampler": self.sampler.state()}

    def load_state(self, state: dict) -> None:
        self.sampler.load(state.get("sampler", {}))


class BaseMeanFold(Fold):
    """Decodes each update against its own bases, then sums it per tensor."""

    def __init__(self, strategy: SplitMix, global_weights: Weights, codec, ctx: CodecContext):
        self.strategy, self.weights, self.codec, self.ctx = strategy, global_weights, codec, ctx
        self.sums = PartialSumByTensor()

    def add(self, device: str, samples: int, tensors: Weights, params: dict,
            variant: str = "full") -> None:
        ref = self.strategy.variant(self.weights, variant)
        ctx = CodecContext(self.ctx.round, self.ctx.seed, ref, device)
        w = self.codec.decode(tensors, params, ctx)
        self.sums.add(w, float(samples))

    def result(self) -> Weights:
        return self.sums.result(self.weights)


__all__ = ["SplitMix", "SplitMixOptions", "SAMPLINGS", "CyclicSampler", "average_bases",
           "bases_for", "choose_bases", "base_of", "subset"]
