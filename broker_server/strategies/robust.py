"""FedAvg's robust step (``FedAvgOptions.robust``): clip, robust rule and central DP
as the round's fold, over any codec whose updates decode to weights (fp32/fp16/int8,
and sign or FedMRN decoded).

Two folds, chosen by what the rule needs (``broker_server.robust`` has the maths):

- streaming (rule ``mean`` with a fixed clip bound, with or without DP): each update
  is decoded, its change ``update - reference`` clipped to the bound and added to a
  running float64 sum, as ``MeanFold`` does: O(params) however many devices report.
- keeping (``median``, ``trimmed``, ``krum``, ``multikrum``, or an adaptive clip
  bound, which needs the round's norms): the decoded updates are held until the
  round closes, n x params float32, plus an n x params float64 matrix while the rule
  runs (20 devices x 1M parameters: 80 MB held, 160 MB at the close).

``RobustAggregation`` is what lasts across rounds: the options, the DP noise's
generator (its seed is the operator's, never the task seed devices know: a device
that knew the noise could subtract it) and the privacy ledger (one RDP composition
a round at that round's sampling rate, devices assigned / devices online). Each
round's fold leaves a record (``Fold.record``) that the round log carries:
rule, clip bound, how many changes were clipped, the devices Krum chose, and with DP
the epsilon spent so far at delta.
"""
from __future__ import annotations

import numpy as np

from broker_server.robust import RobustOptions, RoundRobust, aggregate
from broker_server.robust.accountant import Ledger
from broker_server.strategies.aggregate import PartialSum
from broker_server.strategies.folds import Fold
from device_runtime.codecs import Codec, CodecContext
from device_runtime.codecs.base import Weights
from device_runtime.errors import WireError


class RobustAggregation:
    """The robust step of one job: options, DP generator and ledger, last round's record."""

    def __init__(self, options: RobustOptions, dp_seed: int | None = None):
        self.options = options
        self.rng = np.random.default_rng(dp_seed)  # None: OS entropy
        self.ledger = Ledger(options.dp_noise, options.delta) if options.dp_noise > 0 else None
        self.rate = 1.0  # this round's sampling rate, set when the round is assigned
        # Labelled data the aggregator holds (rule zeno: options.RootData), set by
        # whoever has the data and the model's code (toolkit.field.root_data).
        self.root = None

    @property
    def streaming(self) -> bool:
        return self.options.rule == "mean" and self.options.clip_quantile <= 0

    def fold(self, round_: int, reference: Weights, codec: Codec, ctx: CodecContext) -> Fold:
        return RobustFold(self, reference, codec, ctx)

    def assigned(self, assigned: int, online: int) -> None:
        """The round's sampling rate for the accountant: devices assigned of those online."""
        self.rate = assigned / online if online else 1.0

    def combine(self, updates: list[Weights], reference: Weights, samples: list[float],
                devices: list[str]) -> tuple[Weights, dict]:
        """The keeping fold's close (and ``FedAvg.aggregate``'s): the rule over all."""
        self.options.check(len(updates))
        out, rec = aggregate(self.options, updates, reference, samples, self.rng,
                             self.root)
        return out, self.entry(rec, devices)

    def entry(self, rec: RoundRobust, devices: list[str]) -> dict:
        """The round log's ``robust`` record (and the epsilon spent, with DP)."""
        out = {"rule": rec.rule, "bound": round(rec.bound, 6), "clipped": rec.clipped,
               "devices": len(devices), "chosen": [devices[i] for i in rec.chosen]}
        if self.ledger is not None:
            out.update(epsilon=round(self.ledger.spend(self.rate), 4),
                       delta=self.options.delta, sampling_rate=round(self.rate, 6))
        return out

    def report(self) -> dict:
        """The job report's entries: the rule's name and, with DP, what was spent."""
        out: dict = {"robust": self.options.describe()}
        if self.ledger is not None:
            out["dp"] = {"noise_multiplier": self.options.dp_noise, "clip": self.options.clip,
                         "delta": self.options.delta, "epsilon": round(self.ledger.epsilon(), 4),
                         "rounds": len(self.ledger.rates), "accountant": "dp-accounting RDP"}
        return out

    def state(self) -> dict:
        return {"dp_rates": list(self.ledger.rates)} if self.ledger is not None else {}

    def load_state(self, state: dict) -> None:
        if self.ledger is not None:
            self.ledger.load([float(r) for r in state.get("dp_rates", [])])


class RobustFold(Fold):
    """One round of ``RobustAggregation``: streaming or keeping (see the module doc)."""

    def __init__(self, robust: RobustAggregation, reference: Weights, codec: Codec,
                 ctx: CodecContext):
        self.robust, self.opts, self.ref = robust, robust.options, reference
        self.codec, self.ctx = codec, ctx
        self.kept: dict[str, tuple[Weights, float]] = {}  # device -> (update, samples)
        self.sum, self.clipped, self.devices = PartialSum(), 0, []
        self.last: dict = {}

    def add(self, device: str, samples: int, tensors: Weights, params: dict,
            variant: str = "full") -> None:
        w = self.codec.decode(tensors, params, self.ctx)
        if set(w) != set(self.ref):
            raise WireError(f"robust: update has tensors {sorted(w)}, expected "
                            f"{sorted(self.ref)}")
        change = {k: w[k].astype(np.float64) - self.ref[k] for k in self.ref}
        norm = float(np.sqrt(sum(float(np.sum(c * c)) for c in change.values())))
        if not np.isfinite(norm):  # median and Krum would sort a NaN as a value
            raise WireError("robust: update has non-finite values")
        if not self.robust.streaming:
            self.kept[device] = (w, float(samples))
            return
        bound = self.opts.clip
        if bound > 0 and norm > bound:
            change = {k: c * (bound / norm) for k, c in change.items()}
            self.clipped += 1
        # DP sums the clipped changes unweighted: a sample count would scale one
        # device's contribution past the bound the noise is calibrated to.
        self.sum.add(change, 1.0 if self.opts.dp_noise > 0 else float(samples))
        self.devices.append(device)

    def result(self) -> Weights:
        if not self.robust.streaming:
            devices = sorted(self.kept)
            out, self.last = self.robust.combine(
                [self.kept[d][0] for d in devices], self.ref,
                [self.kept[d][1] for d in devices], devices)
            return out
        if not self.devices:
            raise ValueError("robust fold: no updates")
        if self.opts.dp_noise > 0:
            change = self._noisy_mean()
        else:
            change = {k: v / self.sum.weight for k, v in self.sum.sums.items()}
        out = {k: (self.ref[k] + change[k]).astype(np.float32) for k in self.ref}
        rec = RoundRobust(self.opts.describe(), self.opts.clip, self.clipped)
        self.last = self.robust.entry(rec, sorted(self.devices))
        return out

    def _noisy_mean(self) -> Weights:
        """(sum of clipped changes + N(0, (z C)^2)) / n, the noise drawn as one flat
        vector in the reference's order (as ``clipping.dp_sum`` draws it)."""
        size = sum(int(v.size) for v in self.ref.values())
        noise = self.robust.rng.normal(0.0, self.opts.dp_noise * self.opts.clip, size=size)
        out, at, n = {}, 0, float(len(self.devices))
        for k, v in self.ref.items():
            out[k] = (self.sum.sums[k] + noise[at:at + v.size].reshape(v.shape)) / n
            at += v.size
        return out

    def record(self) -> dict:
        return {"robust": self.last} if self.last else {}


__all__ = ["RobustAggregation", "RobustFold"]
