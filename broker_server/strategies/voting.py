"""Sign voting as pure numpy functions: majority vote and federated voting (signSGD-FV).

Signs are int8 arrays in {-1, +1}. The federated-voting weights are
w_m = ln((1 - p_m) / p_m), clipped to +-10, where p_m estimates how often device
m's sign disagrees with a reference vote (Park, Poor, Lee, arXiv 2403.16372),
tracked with discounted counters per device or per device and coordinate. The
reference is fedge's leave-one-out vote of the other devices (``others_vote``) or, as
in the authors' code, the round's full decoded vote (``agreement_references``).

``pairwise_reliability`` is the other estimate of p_m (``SignSGDOptions.estimate
= "pairs"``): from how often each pair of devices agrees, with no vote as the
reference. A vote is itself noisy, and a device's agreement with it understates
how much better a reliable device is (measured: weights 2x apart where the true
ones are 8x apart, docs/results/compression.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Signs = dict[str, np.ndarray]
WEIGHT_CLIP = 10.0
# Weights are kept to multiples of 1/256, so that the bit-sliced vote (integer
# weights, see signsgd.VoteFold) decides exactly as the float one does.
WEIGHT_STEPS = 256


def vote_sums(signs: list[Signs], weights: list[float | Signs]) -> dict[str, np.ndarray]:
    """sum_m w_m * s_m per coordinate (float64)."""
    out = {}
    for name in signs[0]:
        acc = np.zeros(signs[0][name].shape, np.float64)
        for s, w in zip(signs, weights):
            acc += s[name] * _at(w, name)
        out[name] = acc
    return out


def weighted_vote(signs: list[Signs], weights: list[float | Signs]) -> Signs:
    """sign(sum_m w_m * s_m) per coordinate; a tie decodes to 0 (no step)."""
    return {k: np.sign(v).astype(np.int8) for k, v in vote_sums(signs, weights).items()}


def others_vote(sums: dict[str, np.ndarray], signs: Signs, weight: float | Signs) -> Signs:
    """The vote without one device (leave-one-out): sign(sums - w_m * s_m).

    A device's reliability is measured against the others' vote, not one it took
    part in: with a noisy majority, each noisy voter agrees with the full vote
    partly because it cast it, and the estimates would not separate them.
    """
    return {k: np.sign(sums[k] - signs[k] * _at(weight, k)).astype(np.int8) for k in sums}


def agreement_references(signs: list[Signs], sums: dict[str, np.ndarray],
                         weights: list[float | Signs], per_coordinate: bool,
                         reference: str) -> list[Signs]:
    """What each device's signs are compared with to count its agreement.

    ``reference`` "all": the round's decoded vote sign(sums), the device included (the
    authors' code). "others": the vote without the device; per coordinate the others'
    *unweighted* majority: measured against the weighted vote, a coordinate where noise
    made every weight negative inverts the vote, every device then disagrees with it,
    and the weights stay negative (the model climbs the loss there).
    """
    if reference == "all":
        decoded = {k: np.sign(v).astype(np.int8) for k, v in sums.items()}
        return [decoded] * len(signs)
    if per_coordinate:
        plain = vote_sums(signs, [1.0] * len(signs))
        return [others_vote(plain, s, 1.0) for s in signs]
    return [others_vote(sums, s, w) for s, w in zip(signs, weights)]


def sampled_agreement(s: np.ndarray, q: np.ndarray,
                      reference: str) -> tuple[np.ndarray, np.ndarray]:
    """Per device (row of ``s``: its signs on the sampled coordinates, ``q``: its
    integer vote weight), how many signs agree with the reference vote and on how many
    coordinates that vote decided (a tie is no evidence, ``VotingWeights.update``).

    With sums = q @ s: the full vote is sign(sums), and the others' is
    sign(sums - q_m s_m), which s_m matches <=> s_m * sums > q_m (s in {-1, +1}) and
    ties <=> s_m * sums == q_m; no per-device vote is built.
    """
    sums = q.astype(np.int32) @ s.astype(np.int32)  # |q| <= 2560: 800k devices fit
    agree = s * sums[None, :]
    if reference == "all":
        same = np.count_nonzero(agree > 0, axis=1)
        return same, np.full(len(s), np.count_nonzero(sums))
    same = np.count_nonzero(agree > q[:, None], axis=1)
    return same, s.shape[1] - np.count_nonzero(agree == q[:, None], axis=1)


def pairwise_reliability(s: np.ndarray, iters: int = 30) -> np.ndarray:
    """v_m = 1 - 2 p_m per row of ``s`` (devices x coordinates, signs in {-1, +1}).

    With independent errors, two devices agree in sign on a coordinate with
    E[s_i s_j] = v_i v_j, so the off-diagonal agreement matrix is rank one: v is
    its leading eigenvector, with the unknown diagonal filled in by iteration
    (the moment method for the Dawid-Skene model). Fewer than three devices do
    not identify v: all get 0 (no evidence either way).
    """
    m, k = s.shape
    if m < 3:
        return np.zeros(m)
    x = s.astype(np.float32)
    c = (x @ x.T).astype(np.float64) / k
    off = c - np.diag(np.diag(c))
    v = np.full(m, np.sqrt(max(off.sum() / (m * (m - 1)), 0.0)))
    for _ in range(iters):
        vals, vecs = np.linalg.eigh(off + np.diag(v * v))
        u = vecs[:, -1] * np.sqrt(max(vals[-1], 0.0))
        v = u if u.sum() >= 0 else -u  # most devices are better than chance
    return np.clip(v, -0.999, 0.999)


def sample_positions(n: int, k: int, round_: int) -> np.ndarray:
    """Where round ``round_`` measures agreement among ``n`` coordinates: all if n <= k,
    else a systematic sample, k positions n/k apart from an offset that moves by
    golden-ratio steps each round (so rounds cover the gaps evenly): sorted, spread
    over every tensor, and no random generator to build per round (which cost more
    than the whole vote at 100k parameters)."""
    if n <= k:
        return np.arange(n)
    u = (round_ * 0.6180339887498949) % 1.0
    return np.minimum(((np.arange(k) + u) * (n / k)).astype(np.int64), n - 1)


def _at(w: float | Signs, name: str):
    return w[name] if isinstance(w, dict) else w


def majority_vote(signs: list[Signs]) -> Signs:
    return weighted_vote(signs, [1.0] * len(signs))


def reliability_weight(agree: np.ndarray | float, total: np.ndarray | float,
                       prior: float = 0.0):
    """ln((1 - p) / p), clipped; no history -> weight 1.

    p = (total - agree + prior) / (total + 2 * prior), clipped to (0, 1). Per
    coordinate (one agreement bit a round) ``prior`` = 1 (Laplace): a few rounds
    would otherwise give p = 0 or 1 and weights of +-10 from chance alone, and the
    vote collapses. Per device, each round's agreement is a fraction over many
    coordinates and needs no prior.
    """
    total = np.asarray(total, np.float64)
    p = (total - np.asarray(agree, np.float64) + prior) / np.maximum(total + 2 * prior, 1e-12)
    p = np.clip(p, 1e-6, 1 - 1e-6)
    w = np.round(np.clip(np.log((1 - p) / p), -WEIGHT_CLIP, WEIGHT_CLIP) * WEIGHT_STEPS)
    return np.where(total > 0, w / WEIGHT_STEPS, 1.0)


def _scalar_weight(agree: float, total: float) -> float:
    """``reliability_weight`` for one device's counters (no prior), in plain floats:
    read once per update, where numpy's per-call cost was a tenth of the vote's."""
    if total <= 0:
        return 1.0
    p = min(max((total - agree) / max(total, 1e-12), 1e-6), 1 - 1e-6)
    w = min(max(math.log((1 - p) / p), -WEIGHT_CLIP), WEIGHT_CLIP)
    return float(np.round(w * WEIGHT_STEPS)) / WEIGHT_STEPS


@dataclass
class VotingWeights:
    """Discounted agreement counters: total <- g*total + 1, agree <- g*agree + [s == d]."""

    per_coordinate: bool = False
    gamma: float = 0.99
    prior: float = 1.0  # per coordinate: ``reliability_weight``'s prior (0: the authors')
    total: dict[str, object] = field(default_factory=dict)
    agree: dict[str, object] = field(default_factory=dict)

    def weight(self, device: str) -> float | Signs:
        if device not in self.total:
            return 1.0
        if self.per_coordinate:
            return {k: reliability_weight(self.agree[device][k], self.total[device][k],
                                          self.prior)
                    for k in self.total[device]}
        return _scalar_weight(float(self.agree[device]), float(self.total[device]))

    def update(self, device: str, signs: Signs, decoded: Signs) -> None:
        """Count agreement where the vote decided; a tie (0) is no evidence either way.
        Counted as a disagreement, ties made every device look worse than chance when
        the others are an even number (15 devices: 21% ties, all weights negative)."""
        if self.per_coordinate:
            t = self.total.setdefault(device, {k: np.zeros(v.shape) for k, v in signs.items()})
            a = self.agree.setdefault(device, {k: np.zeros(v.shape) for k, v in signs.items()})
            for k in signs:
                t[k] = self.gamma * t[k] + (decoded[k] != 0)
                a[k] = self.gamma * a[k] + (signs[k] == decoded[k])
        else:
            self.record(device, sum(int((signs[k] == decoded[k]).sum()) for k in signs),
                        sum(int(np.count_nonzero(decoded[k])) for k in signs))

    def record(self, device: str, same: float, n: int) -> None:
        """Per-device counters from a count: ``same`` of ``n`` signs agreed (or, from
        ``pairwise_reliability``, the probability of agreeing: ``n`` = 1)."""
        if n <= 0:  # the vote tied everywhere: nothing learned about this device
            return
        self.total[device] = self.gamma * self.total.get(device, 0.0) + 1
        self.agree[device] = self.gamma * self.agree.get(device, 0.0) + same / max(n, 1)

    def to_json(self) -> dict:
        if self.per_coordinate:  # large arrays stay out of the JSON state
            return {}
        return {"total": self.total, "agree": self.agree}

    def load_json(self, d: dict) -> None:
        if not self.per_coordinate and d:
            self.total = {k: float(v) for k, v in d.get("total", {}).items()}
            self.agree = {k: float(v) for k, v in d.get("agree", {}).items()}
