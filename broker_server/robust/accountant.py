"""Privacy accounting for central DP (DP-FedAvg), through Google's ``dp-accounting``.

Why ``dp-accounting`` (pip ``dp-accounting``, in the ``server`` extra) and not
opacus's RDP accountant: the aggregator must stay torch-free, and opacus needs torch;
``dp-accounting`` needs only numpy, scipy, mpmath, attrs, absl-py and dm-tree. It is
the accountant TensorFlow Privacy and TFF's DP aggregators use, maintained by Google,
and it has both an RDP accountant (the one DP-FedAvg, McMahan et al., ICLR 2018, used)
and a tighter PLD one, plus calibration of the noise for a target epsilon.

The mechanism accounted is the one ``clipping.dp_sum`` runs: each round, each device
of the population is in the round with probability ``sampling_rate`` (Poisson
sampling; 1.0: every device every round), its change clipped to a bound C, and
Gaussian noise of std ``noise_multiplier`` x C added to the sum. The guarantee is
user-level (one device's whole data), over ``rounds`` compositions.

RDP uses integer orders 2..256: with large sampling rates the library's fractional
orders below 2 fail to converge (it logs a warning for each and drops them), and for
the epsilons that matter here (1 to 10) the optimum is at an integer order anyway.
"""
from __future__ import annotations

from broker_server.errors import RobustError

ORDERS = tuple(range(2, 257))
METHODS = ("rdp", "pld")


def _event(noise_multiplier: float, sampling_rate: float):
    from dp_accounting import dp_event  # the server extra; imported only when accounting

    gauss = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling_rate >= 1.0:
        return gauss
    return dp_event.PoissonSampledDpEvent(sampling_rate, gauss)


def _accountant(method: str):
    if method == "rdp":
        from dp_accounting.rdp import rdp_privacy_accountant

        return rdp_privacy_accountant.RdpAccountant(list(ORDERS))
    if method == "pld":
        from dp_accounting.pld import pld_privacy_accountant

        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    raise RobustError(f"dp accountant: method must be one of {', '.join(METHODS)}, "
                      f"got {method!r}")


def _check(rounds: int, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
    if rounds < 0:
        raise RobustError(f"dp accountant: rounds must be >= 0, got {rounds}")
    if noise_multiplier <= 0:
        raise RobustError(f"dp accountant: noise multiplier must be > 0, got "
                          f"{noise_multiplier}")
    if not 0 < sampling_rate <= 1:
        raise RobustError(f"dp accountant: sampling rate must be in (0, 1], got "
                          f"{sampling_rate}")
    if not 0 < delta < 1:
        raise RobustError(f"dp accountant: delta must be in (0, 1), got {delta}")


def epsilon(rounds: int, noise_multiplier: float, sampling_rate: float, delta: float,
            method: str = "rdp") -> float:
    """The epsilon spent after ``rounds`` rounds, at ``delta`` (0 rounds: 0)."""
    _check(rounds, noise_multiplier, sampling_rate, delta)
    if rounds == 0:
        return 0.0
    acc = _accountant(method)
    acc.compose(_event(noise_multiplier, sampling_rate), rounds)
    return float(acc.get_epsilon(delta))


def epsilons(rounds: int, noise_multiplier: float, sampling_rate: float, delta: float,
             method: str = "rdp") -> list[float]:
    """The epsilon after each of rounds 1..``rounds`` (the per-round report). RDP adds
    up over rounds, so one round's RDP is computed once and scaled (computing it is
    what costs: 0.3 s with sampling); PLD composes round by round."""
    _check(rounds, noise_multiplier, sampling_rate, delta)
    acc, event, out = _accountant(method), _event(noise_multiplier, sampling_rate), []
    if method == "rdp" and rounds > 0:
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        acc.compose(event)
        one = acc.rdp
        return [float(compute_epsilon(ORDERS, r * one, delta)[0])
                for r in range(1, rounds + 1)]
    for _ in range(rounds):
        acc.compose(event)
        out.append(float(acc.get_epsilon(delta)))
    return out


def noise_multiplier(target_epsilon: float, rounds: int, sampling_rate: float,
                     delta: float) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds spend at most
    ``target_epsilon`` at ``delta`` (RDP; the library's bracketing search)."""
    from dp_accounting import mechanism_calibration

    if target_epsilon <= 0:
        raise RobustError(f"dp accountant: target epsilon must be > 0, got {target_epsilon}")
    _check(max(rounds, 1), 1.0, sampling_rate, delta)

    def make(z: float):
        from dp_accounting import dp_event

        return dp_event.SelfComposedDpEvent(_event(z, sampling_rate), rounds)

    return float(mechanism_calibration.calibrate_dp_mechanism(
        lambda: _accountant("rdp"), make, target_epsilon, delta,
        mechanism_calibration.ExplicitBracketInterval(1e-2, 1e3), tol=1e-3))


class Ledger:
    """A job's running account (RDP): one composition a round at that round's sampling
    rate, so a rate that changes (devices that come and go) is accounted as it was."""

    def __init__(self, noise_multiplier: float, delta: float):
        _check(0, noise_multiplier, 1.0, delta)
        self.noise_multiplier, self.delta = noise_multiplier, delta
        self.rates: list[float] = []
        self._acc = None

    def spend(self, sampling_rate: float) -> float:
        """Account one more round at ``sampling_rate``; the epsilon spent so far."""
        _check(1, self.noise_multiplier, sampling_rate, self.delta)
        if self._acc is None:
            self._acc = _accountant("rdp")
        self._acc.compose(_event(self.noise_multiplier, sampling_rate))
        self.rates.append(float(sampling_rate))
        return float(self._acc.get_epsilon(self.delta))

    def epsilon(self) -> float:
        return 0.0 if self._acc is None else float(self._acc.get_epsilon(self.delta))

    def load(self, rates: list[float]) -> None:
        """Recompose the rounds of a resumed job (``rates`` from ``self.rates``)."""
        self.rates, self._acc = [], None
        for r in rates:
            self.spend(float(r))
