"""What one device can do to a 1-bit fold, and a cap on its share of the vote.

**Majority vote (signSGD-MV, signSGD-FV; ``strategies.voting``).** The decoded step
per coordinate is ``sign(sum_m w_m s_m)``: its size is the learning rate whatever the
devices send, so no device, however large its values, moves a coordinate by more than
one step a round (FedAvg has no such bound: one update of 1e30 is the model). What a
device m can do is flip the sign where the others are split: with ``A`` the others'
weighted sum and ``H`` their total |weight|, m decides the coordinate iff
``|A| < |w_m|`` (at equality it forces a tie: no step), i.e. iff the others' margin
``|A| / H`` is below ``share / (1 - share)``, its share being ``|w_m| / (H + |w_m|)``
(``flip_margin``).
With equal weights and 20 devices (share 1/20) that is a margin under 1/19: the
coordinates where the honest devices split within 53/47.

signSGD-FV learns the weights: ``ln((1 - p) / p)``, clipped to +-10. A device that
always disagrees (sign flipping) gets a negative weight, so its vote is inverted and
it counts as honest: FV defeats plain sign flipping within a few rounds. The danger is
the other way round: a device that agrees with the others' vote for a while (p near 0)
earns weight 10 against the honest ~1-2, a share of 10 / (10 + 19) = 34% among 20
devices, and can then flip every coordinate whose honest margin is under 0.53.
``cap_shares`` (with ``cap_vote_weights`` for the weights ``VotingWeights.weight``
gives) bounds each device's |weight| to a share of the round's total: with a cap of
0.1 the worst device flips only coordinates with an honest margin under 1/9. The cap
is water-filling: the weights above a level t are cut to t, with t the level at which
each cut device holds exactly the cap; the others are unchanged.

**FedMRN masks (``strategies.folds.FedMRNMean``).** The fold is
``reference + noise * sum_k n_k m_k / N`` with the round's shared noise (uniform,
|noise| <= scale, 0.05 by default) and mask bits m in {0, 1} ({-1, +1} for
``fedmrn-signed``). Whatever mask device j sends, it moves weight i by at most
``|noise_i| x n_j / N`` (twice that signed) against any other mask it could have sent
(``mask_fold_bound``): a bounded, per-coordinate influence, like the vote's. Two
holes remain. The share ``n_j / N`` comes from the device's sample count: the guard
(``broker_server.guard``) caps a count at what the device registered and at
``--max-samples``, which bounds the count, not the share (a device that registered a
large count keeps it); ``cap_shares`` over the counts bounds the share itself. And
the dense part of a FedMRN update (biases, BatchNorm) travels in full precision,
bounded only by the guard's magnitude check, so it needs clipping or a robust rule
like any fp32 update. Over T rounds a persistent attacker adds up to T such steps.

Both folds stay streaming with a cap: the share needs the round's total weight, known
once every device has been counted (the weights are known before their bits arrive:
FV's from the previous rounds, the sample counts from the headers).
"""
from __future__ import annotations

import numpy as np

from broker_server.errors import RobustError

Signs = dict[str, np.ndarray]
# strategies.voting.WEIGHT_STEPS (a test holds them equal): the bit-sliced vote needs
# weights in multiples of 1/256. Not imported: strategies will import this module.
VOTE_STEPS = 256


def cap_shares(weights: np.ndarray, max_share: float, steps: int = 0) -> np.ndarray:
    """Weights (devices along axis 0) with each |weight| cut to at most ``max_share``
    of the total |weight| (per coordinate for arrays of more axes); signs kept, the
    uncut weights unchanged. ``max_share`` >= 1: unchanged. ``steps`` > 0: the cut
    level is rounded down to a multiple of 1/steps (a lower level only lowers the cut
    devices' share, so the cap still holds)."""
    w = np.asarray(weights, np.float64)
    n = w.shape[0]
    if max_share >= 1 or n == 0:
        return w.copy()
    if not max_share * n >= 1 - 1e-12:
        raise RobustError(f"vote cap: {n} devices cannot each hold at most {max_share} of "
                          f"the weight; the cap must be >= 1/{n}")
    a = -np.sort(-np.abs(w), axis=0)  # descending per coordinate
    rest = np.cumsum(a[::-1], axis=0)[::-1]  # rest[k] = sum of a[k:]
    level = np.full(w.shape[1:], np.inf)
    found = np.zeros(w.shape[1:], bool)
    for k in range(n):  # k devices cut to the level t, the rest below it
        if max_share * k >= 1:
            break
        t = max_share * rest[k] / (1 - max_share * k)
        ok = ~found & (t >= a[k]) & ((t <= a[k - 1]) if k else True)
        level = np.where(ok, t, level)
        found |= ok
    if steps > 0:
        level = np.floor(level * steps) / steps
    return np.sign(w) * np.minimum(np.abs(w), level)


def cap_vote_weights(weights: list[float | Signs], max_share: float,
                     steps: int = VOTE_STEPS) -> list[float | Signs]:
    """``cap_shares`` over the weights ``VotingWeights.weight`` gives a round's devices:
    scalars (per device), or dicts of arrays (per device and coordinate), not mixed;
    kept to multiples of 1/``steps`` as the bit-sliced vote needs."""
    if not weights:
        return []
    if all(not isinstance(w, dict) for w in weights):
        return [float(v) for v in cap_shares(np.asarray(weights, np.float64), max_share,
                                                 steps)]
    if not all(isinstance(w, dict) for w in weights):
        raise RobustError("vote cap: weights mix per-device scalars and per-coordinate arrays")
    return _cap_dicts(weights, max_share, steps)


def _cap_dicts(weights: list[Signs], max_share: float, steps: int) -> list[Signs]:
    out: list[Signs] = [{} for _ in weights]
    for name in weights[0]:
        capped = cap_shares(np.stack([w[name] for w in weights]), max_share, steps)
        for i in range(len(weights)):
            out[i][name] = capped[i]
    return out


def flip_margin(share: float) -> float:
    """The honest margin |A| / H below which a device holding ``share`` of the total
    |weight| decides a coordinate's sign: share / (1 - share)."""
    if not 0 <= share < 1:
        raise RobustError(f"vote: share must be in [0, 1), got {share}")
    return share / (1 - share)


def mask_fold_bound(noise: np.ndarray, share: float, signed: bool = False) -> np.ndarray:
    """Per weight, the most one device holding ``share`` of the samples can move a
    FedMRN fold by changing its mask: |noise| x share (x 2 for signed masks)."""
    return np.abs(noise) * share * (2.0 if signed else 1.0)
