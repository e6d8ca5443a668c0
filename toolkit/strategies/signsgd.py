"""signSGD's spec: one-bit signs, majority or fault-tolerant vote
(broker_server/strategies/signsgd.py); batch sizes in proportion to compute.

Its flags default to None, "not given": the options are ``SignSGDOptions()`` or, with
``--paper``, ``SignSGDOptions.paper()``, with each given flag laid over them
(``spec.options_from``); the help names both defaults.
"""
from __future__ import annotations

import argparse

from toolkit.errors import UsageError
from toolkit.strategies.robust import VOTE_CAP, vote_cap
from toolkit.strategies.spec import PAPER, ArgsContext, Flag, StrategySpec, options_from

FLAGS = (
    PAPER,
    Flag(("--sign-decoder",), {"choices": ("mv", "fv"), "default": None,
                               "help": "majority or federated vote (default: fv)"}),
    Flag(("--sign-per-coordinate",), {
        "action": argparse.BooleanOptionalAction, "default": None,
        "help": "FV weights per device and coordinate (default: per device; --paper: per "
                "coordinate)"}),
    Flag(("--sign-estimate",), {
        "choices": ("vote", "pairs"), "default": None,
        "help": "how FV estimates each device's error rate: agreement with a reference "
                "vote, or pairwise agreement between devices (default: vote)"}),
    Flag(("--sign-reference",), {
        "choices": ("others", "all"), "default": None,
        "help": "FV's reference vote: the others' (leave-one-out) or the full decoded one, "
                "the device included (default: others; --paper: all)"}),
    Flag(("--sign-gamma",), {
        "type": float, "default": None, "metavar": "G",
        "help": "discount of FV's agreement counters, in (0, 1] (default: 0.99; --paper: 1)"}),
    Flag(("--sign-warmup",), {
        "type": int, "default": None, "metavar": "ROUNDS",
        "help": "FV: plain majority vote for the first ROUNDS rounds while the counters "
                "fill (default: 5; --paper: 100)"}),
    Flag(("--server-lr",), {"type": float, "default": None,
                            "help": "the server's sign step (default: 0.001)"}),
    Flag(("--server-lr-half-life",), {
        "type": float, "default": None, "metavar": "ROUNDS",
        "help": "halve the server step every ROUNDS rounds (default: 0, constant)"}),
    Flag(("--local-steps",), {"type": int, "default": None,
                              "help": "minibatch steps per device a round (default: 1)"}),
    Flag(("--batch-sizes",), {
        "help": "comma list, one per device (default: in proportion to each profile's "
                "compute, 4..128)"}),
    VOTE_CAP,
)


def _from_args(args: argparse.Namespace, ctx: ArgsContext):
    from broker_server.strategies import SignSGDOptions
    from toolkit.sim.simulate import batch_by_compute

    _check_flags(args)
    opts = options_from(args, SignSGDOptions, decoder=args.sign_decoder,
                        per_coordinate=args.sign_per_coordinate, server_lr=args.server_lr,
                        local_steps=args.local_steps, estimate=args.sign_estimate,
                        reference=args.sign_reference, gamma=args.sign_gamma,
                        warmup_rounds=args.sign_warmup,
                        server_lr_half_life=args.server_lr_half_life,
                        batch_by_device=_batch_sizes(args.batch_sizes, ctx.devices) or None,
                        vote_cap=vote_cap(args, ctx.per_round) or None,
                        batch_by_profile=batch_by_compute([ctx.catalogue.get(p)
                                                           for p in ctx.profiles]))
    if opts.estimate == "pairs" and opts.per_coordinate:
        why = "--paper counts per coordinate; add --no-sign-per-coordinate" \
            if args.sign_per_coordinate is None else "drop --sign-per-coordinate"
        raise UsageError(f"--sign-estimate pairs: estimates one weight per device; {why}")
    return opts


def _check_flags(args: argparse.Namespace) -> None:
    """A UsageError naming the first flag given out of range (None: not given)."""
    for flag, value, expected, bad in (
            ("--server-lr-half-life", args.server_lr_half_life, ">= 0 rounds (0: constant)",
             lambda x: not x >= 0),
            ("--sign-gamma", args.sign_gamma, "a discount in (0, 1]",
             lambda x: not 0 < x <= 1),
            ("--sign-warmup", args.sign_warmup, ">= 0 rounds", lambda x: x < 0)):
        if value is not None and bad(value):
            raise UsageError(f"{flag}: expected {expected}, got {value}")


def _batch_sizes(text: str | None, devices: int) -> dict[str, int]:
    if not text:
        return {}
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise UsageError(f"--batch-sizes: expected integers, got {text!r}") from None
    if len(sizes) != devices or min(sizes) < 1:
        raise UsageError(f"--batch-sizes: expected {devices} positive sizes, got "
                         f"{len(sizes)}")
    return {f"dev-{k}": b for k, b in enumerate(sizes)}


SPEC = StrategySpec(
    rule="broker_server.strategies.signsgd:SignSGD",
    options="broker_server.strategies.signsgd:SignSGDOptions", flags=FLAGS, from_args=_from_args)
