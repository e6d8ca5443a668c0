"""signSGD's spec: one-bit signs, majority or fault-tolerant vote
(broker_server/strategies/signsgd.py); batch sizes in proportion to compute."""
from __future__ import annotations

import argparse

from toolkit.errors import UsageError
from toolkit.strategies.robust import VOTE_CAP, vote_cap
from toolkit.strategies.spec import ArgsContext, Flag, StrategySpec

FLAGS = (
    Flag(("--sign-decoder",), {"choices": ("mv", "fv"), "default": "fv"}),
    Flag(("--sign-per-coordinate",), {
        "action": "store_true",
        "help": "FV weights per device and coordinate (default: per device)"}),
    Flag(("--sign-estimate",), {
        "choices": ("vote", "pairs"), "default": "vote",
        "help": "how FV estimates each device's error rate: agreement with the others' "
                "vote, or pairwise agreement between devices"}),
    Flag(("--server-lr",), {"type": float, "default": 1e-3}),
    Flag(("--server-lr-half-life",), {
        "type": float, "default": 0.0, "metavar": "ROUNDS",
        "help": "halve the server step every ROUNDS rounds (default 0: constant)"}),
    Flag(("--local-steps",), {"type": int, "default": 1}),
    Flag(("--batch-sizes",), {
        "help": "comma list, one per device (default: in proportion to each profile's "
                "compute, 4..128)"}),
    VOTE_CAP,
)


def _from_args(args: argparse.Namespace, ctx: ArgsContext):
    from broker_server.strategies import SignSGDOptions
    from toolkit.sim.simulate import batch_by_compute

    if not args.server_lr_half_life >= 0:
        raise UsageError(f"--server-lr-half-life: expected >= 0 rounds (0: constant), got "
                         f"{args.server_lr_half_life}")
    if args.sign_estimate == "pairs" and args.sign_per_coordinate:
        raise UsageError("--sign-estimate pairs: estimates one weight per device; drop "
                         "--sign-per-coordinate")
    return SignSGDOptions(args.sign_decoder, args.sign_per_coordinate, args.server_lr,
                          local_steps=args.local_steps,
                          batch_by_device=_batch_sizes(args.batch_sizes, ctx.devices),
                          estimate=args.sign_estimate,
                          server_lr_half_life=args.server_lr_half_life,
                          vote_cap=vote_cap(args, ctx.per_round),
                          batch_by_profile=batch_by_compute([ctx.catalogue.get(p)
                                                             for p in ctx.profiles]))


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
