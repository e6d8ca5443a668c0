"""Robust aggregation, norm clipping and central DP for the aggregator (torch-free numpy).

- ``rows``: the stacked form (one float64 row per device) and the two row operations
  (weighted mean, norm clip) the rules and clipping share.
- ``rules``: coordinate-wise median, trimmed mean, Krum and multi-Krum over
  ``list[Weights]``; the memory they cost (every update held: O(n x params)).
- ``clipping``: fixed and adaptive (quantile) norm clipping of changes, and DP-FedAvg's
  Gaussian noise on the clipped sum.
- ``accountant``: epsilon at delta per round through ``dp-accounting`` (server extra),
  imported only when accounting.
- ``options``: ``RobustOptions`` (typed; ``check(devices)`` one-line errors),
  ``parse_rule`` for ``--robust median|trimmed:0.1|krum:2|multikrum:2:5`` and
  ``aggregate``, one round's clip -> rule -> noise.
- ``votes``: what one device can do to a majority-vote or FedMRN mask fold, and a cap
  on each device's share of the vote weight.

Nothing here is wired into a strategy yet: a strategy plugin calls ``aggregate`` from
its ``aggregate`` (with a fold that keeps the updates, as ``DecodeAll`` does).
"""
from broker_server.robust.options import RULES, RobustOptions, RoundRobust, aggregate, parse_rule

__all__ = ["RULES", "RobustOptions", "RoundRobust", "aggregate", "parse_rule"]
