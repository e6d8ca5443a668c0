"""The robust rule as a typed option, its CLI syntax, its checks, and one round's pipeline.

``parse_rule`` reads the ``--robust`` syntax: ``mean`` (FedAvg, the default),
``median``, ``trimmed[:beta]``, ``krum[:f]``, ``multikrum[:f[:m]]``, ``zeno[:b[:step]]``,
``fltrust[:clip|server]`` (defaults: beta 0.1, f and b 1, m n - f, step 0.1, clip). ``zeno`` and
``fltrust`` need the server's own labelled data: ``aggregate``'s ``root``
(``RootData``). ``RobustOptions``
adds the clip bound (fixed, or a quantile of the round's norms) and the DP noise, and
``check(devices)`` refuses inconsistent choices in one line before a round starts.
``aggregate`` runs one round: clip the changes (if asked), apply the rule, add the DP
noise (if asked), and returns the new model and a ``RoundRobust`` record for the report.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from broker_server.errors import RobustError
from broker_server.robust import clipping, rules
from broker_server.robust.rules import Weights

RULES = ("mean", "median", "trimmed", "krum", "multikrum", "zeno", "fltrust")
DEFAULT_STEP = 0.1  # zeno's step along each change (measured: docs/results/robust.md)
DEFAULT_BETA = 0.1


@dataclass(frozen=True)
class RobustOptions:
    """rule: one of RULES; beta: trimmed mean's cut per side; f: Byzantine devices Krum
    tolerates, or updates zeno drops; m: updates multi-Krum averages (0: n - f); step:
    zeno's step along each change; size: how fltrust sizes the changes (clip: at the
    round's median norm; server: each to the server's own, as published); clip: a
    fixed L2 bound on each change (0: none); clip_quantile: the adaptive bound, a
    quantile of the round's change norms (0: none); dp_noise: the DP noise multiplier
    (0: no DP); delta: DP's delta."""

    rule: str = "mean"
    beta: float = DEFAULT_BETA
    f: int = 0
    m: int = 0
    step: float = DEFAULT_STEP
    size: str = "clip"
    clip: float = 0.0
    clip_quantile: float = 0.0
    dp_noise: float = 0.0
    delta: float = 1e-5

    def check(self, devices: int) -> None:
        """One-line RobustError for a choice that cannot run with ``devices`` a round."""
        if self.rule not in RULES:
            raise RobustError(f"robust: unknown rule {self.rule!r}; valid: {', '.join(RULES)}")
        if devices < 1:
            raise RobustError(f"robust: needs at least 1 device a round, got {devices}")
        if self.rule == "trimmed":
            rules.trim_count(devices, self.beta)
        if self.rule in ("krum", "multikrum"):
            rules.check_krum(devices, self.f)
        if self.rule == "zeno":
            rules.check_zeno(devices, self.f)
            if not 0 < self.step <= 1:
                raise RobustError(f"zeno: step must be in (0, 1], got {self.step}")
        if self.rule == "fltrust" and self.size not in rules.FLTRUST_SIZES:
            raise RobustError(f"fltrust: size must be one of "
                              f"{', '.join(rules.FLTRUST_SIZES)}, got {self.size!r}")
        if self.rule == "multikrum" and not 0 <= self.m <= devices - self.f:
            raise RobustError(f"multikrum: m must be in [1, n - f] = [1, {devices - self.f}] "
                              f"(0: n - f), got {self.m}")
        self._check_clip()
        self._check_dp()

    def _check_clip(self) -> None:
        if self.clip < 0:
            raise RobustError(f"clip: bound must be >= 0 (0: none), got {self.clip}")
        if not 0 <= self.clip_quantile <= 1:
            raise RobustError(f"clip: quantile must be in [0, 1] (0: none), got "
                              f"{self.clip_quantile}")
        if self.clip > 0 and self.clip_quantile > 0:
            raise RobustError(f"clip: give a fixed bound ({self.clip}) or a quantile "
                              f"({self.clip_quantile}), not both")

    def _check_dp(self) -> None:
        if self.dp_noise < 0:
            raise RobustError(f"dp: noise multiplier must be >= 0, got {self.dp_noise}")
        if self.dp_noise == 0:
            return
        if self.clip_quantile > 0:
            raise RobustError("dp: needs a fixed clip bound; the adaptive (quantile) bound "
                              "depends on the round's updates and is not private")
        if self.clip <= 0:
            raise RobustError("dp: noise without clipping bounds nothing; give a clip bound")
        if self.rule != "mean":
            raise RobustError(f"dp: the noise is calibrated to the clipped sum (rule mean), "
                              f"got rule {self.rule!r}")
        if not 0 < self.delta < 1:
            raise RobustError(f"dp: delta must be in (0, 1), got {self.delta}")

    def describe(self) -> str:
        """The rule as the report names it, e.g. ``trimmed:0.1+clip:q0.5``."""
        name = {"mean": "mean", "median": "median", "trimmed": f"trimmed:{self.beta:g}",
                "krum": f"krum:{self.f}",
                "multikrum": f"multikrum:{self.f}" + (f":{self.m}" if self.m else ""),
                "zeno": f"zeno:{self.f}:{self.step:g}",
                "fltrust": f"fltrust:{self.size}"}.get(self.rule, self.rule)
        if self.clip > 0:
            name += f"+clip:{self.clip:g}"
        if self.clip_quantile > 0:
            name += f"+clip:q{self.clip_quantile:g}"
        if self.dp_noise > 0:
            name += f"+dp:{self.dp_noise:g}"
        return name


def parse_rule(text: str, **extra) -> RobustOptions:
    """``median``, ``trimmed:0.1``, ``krum:2``, ``multikrum:2:5`` -> RobustOptions;
    ``extra`` sets the other fields (clip, dp_noise, ...)."""
    name, *args = text.strip().split(":")
    if name not in RULES:
        raise RobustError(f"robust: unknown rule {name!r}; valid: {', '.join(RULES)}")
    arity = {"mean": 0, "median": 0, "trimmed": 1, "krum": 1, "multikrum": 2,
             "zeno": 2, "fltrust": 1}[name]
    if len(args) > arity:
        raise RobustError(f"robust: {name} takes at most {arity} ':' argument(s), got "
                          f"{text!r}")
    try:
        if name == "trimmed":
            extra["beta"] = float(args[0]) if args else DEFAULT_BETA
        elif name in ("krum", "multikrum"):
            extra["f"] = int(args[0]) if args else 1
            extra["m"] = int(args[1]) if len(args) > 1 else 0
        elif name == "zeno":
            extra["f"] = int(args[0]) if args else 1
            extra["step"] = float(args[1]) if len(args) > 1 else DEFAULT_STEP
        elif name == "fltrust" and args:
            extra["size"] = args[0]
    except ValueError:
        raise RobustError(f"robust: {text!r} has a value that is not a number") from None
    fields = {f.name for f in dataclasses.fields(RobustOptions)}
    if set(extra) - fields:
        raise RobustError(f"robust: unknown option(s) {sorted(set(extra) - fields)}")
    return RobustOptions(rule=name, **extra)


@dataclass(frozen=True)
class RoundRobust:
    """What one round's robust step did: the rule's name, the clip bound used (0: none),
    how many changes were clipped, and the chosen updates (Krum, zeno; fltrust: those
    with trust above 0; else empty)."""

    rule: str
    bound: float = 0.0
    clipped: int = 0
    chosen: tuple[int, ...] = ()


class RootData(Protocol):
    """Labelled data the aggregator holds and the model's code to use it (toolkit's
    ``field.root_data``): what zeno measures the devices' updates against."""

    def loss(self, weights: Weights) -> float:
        """The model's mean cross-entropy on the root data."""

    def update(self, weights: Weights) -> Weights:
        """The model after the job's local training from ``weights`` on the root data
        (what a device holding the root data would send)."""


def _statistics(shapes: dict[str, tuple[int, ...]]) -> np.ndarray:
    """A mask over the flat columns: True where a tensor is a BatchNorm statistic."""
    from device_runtime.codecs.base import is_statistic

    return np.concatenate([np.full(int(np.prod(s)), is_statistic(k)) for k, s in
                           shapes.items()]) if shapes else np.zeros(0, bool)


def aggregate(options: RobustOptions, updates: list[Weights], reference: Weights,
              samples: list[float] | None = None, rng: np.random.Generator | None = None,
              root: RootData | None = None) -> tuple[Weights, RoundRobust]:
    """One round: clip, then the rule over the changes, then DP noise; reference + result.
    ``root``: the aggregator's own labelled data (rules zeno and fltrust)."""
    options.check(len(updates))
    if options.rule in ("zeno", "fltrust") and root is None:
        raise RobustError(f"{options.rule}: needs labelled data on the aggregator to judge "
                          "updates by (fedge serve --root-data; fedge simulate uses its "
                          "public split)")
    x, shapes = clipping.changes(updates, reference)
    bound, n_clipped = 0.0, 0
    if options.clip > 0 or options.clip_quantile > 0:
        bound = options.clip or clipping.adaptive_bound(np.linalg.norm(x, axis=1),
                                                        options.clip_quantile)
        if bound > 0:  # an adaptive bound of 0: every change at that quantile is zero
            x, _, n_clipped = clipping.clip_rows(x, bound)
    chosen: tuple[int, ...] = ()
    if options.dp_noise > 0:
        if rng is None:
            raise RobustError("dp: needs a random generator (rng) for the noise")
        change = clipping.dp_sum(x, bound, options.dp_noise, rng) / len(updates)
    elif options.rule == "median":
        change = np.median(x, axis=0)
    elif options.rule == "trimmed":
        change = rules.trimmed_rows(x, options.beta)
    elif options.rule in ("krum", "multikrum"):
        m = 1 if options.rule == "krum" else (options.m or len(updates) - options.f)
        chosen = tuple(rules.krum_rows(x, options.f, m))
        w = None if samples is None else [samples[i] for i in chosen]
        change = rules.weighted_rows(x[list(chosen)], w)
    elif options.rule == "zeno":
        chosen = tuple(rules.zeno_rows(
            x, options.f, lambda row: root.loss(clipping.apply(reference, row, shapes)),
            options.step))
        w = None if samples is None else [samples[i] for i in chosen]
        change = rules.weighted_rows(x[list(chosen)], w)
    elif options.rule == "fltrust":
        g0, _ = clipping.changes([root.update(reference)], reference)
        change, trust = rules.fltrust_rows(x, g0[0], _statistics(shapes), options.size)
        chosen = tuple(int(i) for i in np.flatnonzero(trust > 0))
    else:
        change = rules.weighted_rows(x, samples)
    out = clipping.apply(reference, change, shapes)
    return out, RoundRobust(options.describe(), bound, n_clipped, chosen)
