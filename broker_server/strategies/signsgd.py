"""signSGD with majority vote (mv) or federated voting (fv), in its FL form:
devices run a few local steps with their own minibatch size and send the sign
of their model delta (codec ``sign``); the server decodes the vote and takes
one signed step of ``server_lr``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from broker_server.strategies.aggregate import weighted_average
from broker_server.strategies.base import Assignment, DeviceInfo, Strategy, Update, Weights
from broker_server.strategies.voting import (VotingWeights, agreement_references,
                                             pairwise_reliability, sample_positions, vote_sums)
from device_runtime.codecs.base import is_statistic


@dataclass(frozen=True)
class SignSGDOptions:
    decoder: str = "fv"  # "mv" | "fv"
    per_coordinate: bool = False
    server_lr: float = 1e-3
    # Rounds over which the server step halves (0: constant). A fixed sign step keeps the
    # model oscillating by +-server_lr per coordinate at the end of training.
    server_lr_half_life: float = 0.0
    warmup_rounds: int = 5  # plain majority vote while the FV counters fill
    gamma: float = 0.99
    agreement_sample: int = 2048  # coordinates per round on which p_m is measured
    local_steps: int = 1
    batch_by_device: dict = field(default_factory=dict)  # explicit sizes win
    batch_by_profile: dict = field(default_factory=dict)
    # How FV estimates p_m: "vote" (agreement with the others' vote, the paper's) or
    # "pairs" (pairwise agreement, voting.pairwise_reliability); per device only.
    estimate: str = "vote"
    # FV: each device's |weight| at most this share of the round's total (0: no cap;
    # ``broker_server.robust.votes``): a device that earned the top weight cannot
    # decide coordinates the honest devices agree on.
    vote_cap: float = 0.0
    # What FV (estimate "vote") counts a device's agreement against: "others", the vote
    # without it (leave-one-out, see voting.others_vote), or "all", the round's decoded
    # vote, the device included, as the authors' code does.
    reference: str = "others"
    # Per-coordinate counters: the prior of voting.reliability_weight (1: Laplace; 0: none,
    # the authors'); per-device counters have none.
    coordinate_prior: float = 1.0

    @classmethod
    def paper(cls) -> SignSGDOptions:
        """signSGD-FV as the authors' code runs it (docs/ALGORITHMS.md, "Paper modes"):
        counters per device and coordinate (every coordinate counted, no prior),
        undiscounted (gamma 1), against the full decoded vote, 100 iterations of
        majority vote first (one round of ``local_steps`` 1 is one iteration)."""
        return cls(decoder="fv", per_coordinate=True, gamma=1.0, reference="all",
                   warmup_rounds=100, coordinate_prior=0.0)

    def check(self) -> None:
        """ValueError naming the first field out of range, expected and actual value."""
        for name, value, ok in (("decoder", self.decoder, ("mv", "fv")),
                                ("estimate", self.estimate, ("vote", "pairs")),
                                ("reference", self.reference, ("others", "all"))):
            if value not in ok:
                raise ValueError(f"{name}: expected {' or '.join(ok)}, got {value!r}")
        if self.estimate == "pairs" and self.per_coordinate:
            raise ValueError("estimate pairs: per device only, not with per_coordinate")
        for name, value, expected, good in (
                ("server_lr_half_life", self.server_lr_half_life, ">= 0 rounds (0: constant)",
                 self.server_lr_half_life >= 0),
                ("vote_cap", self.vote_cap, "a share in [0, 1] (0: none)",
                 0 <= self.vote_cap <= 1),
                ("agreement_sample", self.agreement_sample, ">= 1 coordinates",
                 self.agreement_sample >= 1),
                ("gamma", self.gamma, "a discount in (0, 1]", 0 < self.gamma <= 1),
                ("warmup_rounds", self.warmup_rounds, ">= 0 rounds", self.warmup_rounds >= 0),
                ("coordinate_prior", self.coordinate_prior, ">= 0",
                 self.coordinate_prior >= 0)):
            if not good:  # written so that NaN fails too
                raise ValueError(f"{name}: expected {expected}, got {value}")


class SignSGD(Strategy):
    name = "signsgd"
    coded_downlink = True

    @classmethod
    def split_options(cls, codec: str, options: object | None) -> dict | None:
        """A majority vote is a sum of signs, split over workers; FV's weights (and
        the counters they come from, whatever their reference) are not. A majority vote
        never reads counters, so ``per_coordinate`` (``--paper``'s) does not matter."""
        opts = options if isinstance(options, SignSGDOptions) else SignSGDOptions()
        if codec == "sign" and opts.decoder == "mv":
            return {"decoder": "mv"}
        return None

    @classmethod
    def for_worker(cls, options: dict) -> Strategy | None:
        if options.get("decoder") == "mv":
            return cls(options=SignSGDOptions(decoder="mv"))
        return None

    def __init__(self, epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
                 options: SignSGDOptions | None = None):
        self.opts = options or SignSGDOptions()
        self.opts.check()
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.votes = VotingWeights(self.opts.per_coordinate, self.opts.gamma,
                                   self.opts.coordinate_prior)

    def batch_for(self, d: DeviceInfo) -> int:
        return int(self.opts.batch_by_device.get(d.id)
                   or self.opts.batch_by_profile.get(d.profile) or self.batch_size)

    def assign(self, round_: int, devices: list[DeviceInfo]) -> dict[str, Assignment]:
        return {d.id: Assignment("full", self.epochs, self.batch_for(d), self.lr,
                                 steps=self.opts.local_steps) for d in devices}

    def weighted(self, round_: int) -> bool:
        return self.opts.decoder == "fv" and round_ > self.opts.warmup_rounds

    def fold(self, round_: int, global_weights: Weights, codec, ctx):
        # Per-coordinate counters need every update's signs unpacked; MV reads none.
        if codec.name != "sign" or (self.opts.per_coordinate and self.opts.decoder == "fv"):
            return super().fold(round_, global_weights, codec, ctx)
        from broker_server.strategies.vote_fold import VoteFold

        return VoteFold(self, round_, global_weights)

    def aggregate(self, round_: int, global_weights: Weights, updates: list[Update]) -> Weights:
        signs = [_signs(u, global_weights) for u in updates]
        stats = weighted_average([({k: u.weights[k] for k in global_weights if is_statistic(k)},
                                   float(u.samples)) for u in updates])
        weights = self.capped([self.votes.weight(u.device) if self.weighted(round_) else 1.0
                               for u in updates], round_)
        sums = vote_sums(signs, weights)
        decoded = {k: np.sign(v).astype(np.int8) for k, v in sums.items()}
        if self.opts.decoder == "fv" and self.opts.estimate == "pairs":
            flat = np.stack([np.concatenate([x[k].reshape(-1) for k in sorted(x)])
                             for x in signs])
            n, k = flat.shape[1], self.opts.agreement_sample
            flat = flat[:, sample_positions(n, k, round_)]  # as VoteFold samples
            for u, v in zip(updates, pairwise_reliability(flat)):
                self.votes.record(u.device, (1 + float(v)) / 2, 1)
        elif self.opts.decoder == "fv":  # a majority vote never reads the counters
            refs = agreement_references(signs, sums, weights, self.opts.per_coordinate,
                                        self.opts.reference)
            for u, s, ref in zip(updates, signs, refs):
                self.votes.update(u.device, s, ref)
        return self.step(round_, global_weights, decoded, stats)

    def capped(self, weights: list, round_: int) -> list:
        """The round's vote weights with each device's share capped (``vote_cap``)."""
        if not self.opts.vote_cap or not self.weighted(round_):
            return weights
        from broker_server.robust.votes import cap_vote_weights

        # Fewer devices than 1 / cap reported: each may hold at most an equal share.
        return cap_vote_weights(weights, max(self.opts.vote_cap, 1.0 / max(len(weights), 1)))

    def report(self) -> dict:
        return {"vote_cap": self.opts.vote_cap} if self.opts.vote_cap else {}

    def server_lr(self, round_: int) -> float:
        """The server step of round ``round_`` (1-based): halved every half-life."""
        h = self.opts.server_lr_half_life
        return self.opts.server_lr * (0.5 ** ((round_ - 1) / h) if h else 1.0)

    def step(self, round_: int, global_weights: Weights, decoded: dict[str, np.ndarray],
             stats: Weights) -> Weights:
        """One signed step of the round's server lr along the decoded vote; running
        statistics are the devices' mean (they are measured, not trained)."""
        lr = np.float32(self.server_lr(round_))  # float32 throughout: no float64 temporaries
        out = {k: np.multiply(decoded[k], lr, dtype=np.float32) + w
               for k, w in global_weights.items() if k in decoded}
        out.update({k: v.astype(np.float32) for k, v in stats.items()})
        return {k: out[k] for k in global_weights}

    def state(self) -> dict:
        return self.votes.to_json()

    def load_state(self, state: dict) -> None:
        self.votes.load_json(state)


def _signs(u: Update, reference: Weights) -> dict[str, np.ndarray]:
    """The device's signs: from the raw sign frame when there is one, else from the delta."""
    if u.raw is not None:
        from device_runtime.codecs.sign import signs_of

        return signs_of(u.raw[0], u.raw[1], {k: v.shape for k, v in reference.items()})
    return {k: np.where(u.weights[k] - reference[k] >= 0, 1, -1).astype(np.int8)
            for k in reference if not is_statistic(k)}
