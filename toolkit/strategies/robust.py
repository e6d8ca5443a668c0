"""The robust-aggregation flags (``--robust``, ``--clip``, ``--clip-quantile``, ``--dp-*``)
and signSGD-FV's ``--vote-cap``, turned into typed options and checked before a job runs.

``--robust`` defaults to ``mean`` (FedAvg): ``--clip 2`` alone is the clipped mean, and
no flag at all leaves FedAvg as it was (no wrapper). A flag meant for strategies
other than ``--strategy`` is a one-line error, not silently ignored (``refuse_unused``).
"""
from __future__ import annotations

import argparse

from toolkit.errors import UsageError
from toolkit.strategies.spec import Flag

ROBUST = Flag(("--robust",), {
    "metavar": "RULE", "help": "robust rule: mean (default), median, trimmed[:beta], "
    "krum[:f], multikrum[:f[:m]], zeno[:b[:step]], fltrust (fedavg; every rule but mean "
    "holds every update of a round: n x model size floats; zeno and fltrust need serve "
    "--root-data)"})
CLIP = Flag(("--clip",), {"type": float, "default": 0.0, "metavar": "X",
                          "help": "clip each change to L2 norm X (0: no clip)"})
CLIP_QUANTILE = Flag(("--clip-quantile",), {
    "type": float, "default": 0.0, "metavar": "Q",
    "help": "adaptive clip: the Q-quantile of the round's change norms (0: none)"})
DP_NOISE = Flag(("--dp-noise",), {
    "type": float, "default": 0.0, "metavar": "Z",
    "help": "central DP: Gaussian noise of std Z x clip on the clipped sum (needs --clip)"})
DP_DELTA = Flag(("--dp-delta",), {"type": float, "default": 1e-5, "metavar": "D",
                                  "help": "the delta the reported epsilon holds at"})
DP_SEED = Flag(("--dp-seed",), {"type": int, "default": None,
                                "help": "seed of the DP noise (default: OS entropy; "
                                        "fedge simulate: --seed)"})
VOTE_CAP = Flag(("--vote-cap",), {
    "type": float, "default": 0.0, "metavar": "C",
    "help": "signSGD-FV: cap each device's share of a round's vote weight at C (0: none)"})

SHARE_CAP = Flag(("--share-cap",), {
    "type": float, "default": 0.0, "metavar": "C",
    "help": "FedAvg over FedMRN masks: cap each device's share of a round's sample "
            "weight at C (0: none)"})

ROBUST_FLAGS = (ROBUST, CLIP, CLIP_QUANTILE, DP_NOISE, DP_DELTA, DP_SEED)
GUARDED = ROBUST_FLAGS + (VOTE_CAP, SHARE_CAP)  # flags some strategies do not read


def _dest(flag: Flag) -> str:
    return flag.names[0].lstrip("-").replace("-", "_")


def _given(args: argparse.Namespace, flag: Flag) -> bool:
    return getattr(args, _dest(flag), None) != flag.kwargs.get("default")


def refuse_unused(args: argparse.Namespace, strategy: str, flags: tuple[Flag, ...]) -> None:
    """UsageError if a guarded flag was given that ``strategy`` (its ``flags``) ignores."""
    for flag in GUARDED:
        if flag not in flags and _given(args, flag):
            raise UsageError(f"{flag.names[0]}: strategy {strategy} does not support it "
                             f"({'signsgd' if flag is VOTE_CAP else 'fedavg'} does)")


def robust_options(args: argparse.Namespace, per_round: int):
    """``RobustOptions`` from the flags (None: none given), checked for ``per_round``
    devices a round (0: unknown, checked as 1)."""
    from broker_server.errors import RobustError
    from broker_server.robust import parse_rule

    if not any(_given(args, f) for f in ROBUST_FLAGS if f is not DP_SEED):
        return None
    try:
        opts = parse_rule(args.robust or "mean", clip=args.clip,
                          clip_quantile=args.clip_quantile, dp_noise=args.dp_noise,
                          delta=args.dp_delta)
        opts.check(max(per_round, 1))
    except RobustError as e:
        raise UsageError(str(e)) from None
    return opts


def vote_cap(args: argparse.Namespace, per_round: int, flag: str = "--vote-cap") -> float:
    """``--vote-cap`` (or ``--share-cap``), checked: in (0, 1], at least 1 / devices a
    round."""
    cap = float(getattr(args, flag.lstrip("-").replace("-", "_"), 0.0) or 0.0)
    if cap == 0:
        return 0.0
    if not 0 < cap <= 1:
        raise UsageError(f"{flag}: expected a share in (0, 1] (0: none), got {cap}")
    if per_round and cap * per_round < 1:
        raise UsageError(f"{flag} {cap}: {per_round} devices a round cannot each hold "
                         f"at most {cap} of the weight; expected >= 1/{per_round}")
    return cap


def share_cap(args: argparse.Namespace, per_round: int) -> float:
    """``--share-cap``, checked like ``--vote-cap``; FedMRN masks only."""
    cap = vote_cap(args, per_round, "--share-cap")
    if cap and not str(getattr(args, "codec", "")).startswith("fedmrn"):
        raise UsageError(f"--share-cap: caps FedMRN mask folds; expected --codec fedmrn or "
                         f"fedmrn-signed, got {getattr(args, 'codec', None)!r}")
    return cap


def round_note(rec: dict) -> str:
    """The round line's robust part: clipped changes and, with DP, epsilon so far."""
    r = rec.get("robust")
    if not r:
        return ""
    out = f"{r['rule']}" + (f" clipped {r['clipped']}" if r.get("bound") else "")
    return out + (f" epsilon {r['epsilon']:.3g}" if "epsilon" in r else "")
