"""The strategies' command-line options, shared by ``fedge simulate`` and ``fedge serve``,
turned into each strategy's typed options (the rest is filled in from the fleet by
``toolkit.setups.setup_strategy``)."""
from __future__ import annotations

import argparse

from toolkit.errors import UsageError


def add(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fedavg")
    g.add_argument("--train-profiles", help="comma list: only devices of these profiles "
                   "train (e.g. full width on the devices that can afford it)")
    g = p.add_argument_group("splitmix / heterofl")
    g.add_argument("--splitmix-atom", type=float, default=0.125,
                   help="base width r (M = 1/r bases)")
    g.add_argument("--budgets", help="comma list profile=width, e.g. rpi4=0.25,jetson-orin-"
                   "nano=1 (default: from each profile's compute)")
    g = p.add_argument_group("reft")
    g.add_argument("--reft-uplink", choices=("weights", "logits"), default="weights",
                   help="devices send their pruned models, or only their logits on the "
                   "server's public split")
    g = p.add_argument_group("ecofed / dpfl")
    g.add_argument("--period", type=int, default=2, help="devices send activations every "
                   "PERIOD rounds; the server trains on its replay buffers in between")
    g.add_argument("--split-after", type=int, help="cut after this stage (default: the "
                   "planner's choice, per profile for dpfl)")
    g.add_argument("--shared-tail", action="store_true",
                   help="one tail trained over all buffers (default: one per device, averaged)")
    g = p.add_argument_group("signsgd")
    g.add_argument("--sign-decoder", choices=("mv", "fv"), default="fv")
    g.add_argument("--sign-per-coordinate", action="store_true",
                   help="FV weights per device and coordinate (default: per device)")
    g.add_argument("--sign-estimate", choices=("vote", "pairs"), default="vote",
                   help="how FV estimates each device's error rate: agreement with the "
                   "others' vote, or pairwise agreement between devices")
    g.add_argument("--server-lr", type=float, default=1e-3)
    g.add_argument("--server-lr-half-life", type=float, default=0.0, metavar="ROUNDS",
                   help="halve the server step every ROUNDS rounds (default 0: constant)")
    g.add_argument("--local-steps", type=int, default=1)
    g.add_argument("--batch-sizes", help="comma list, one per device (default: in proportion "
                   "to each profile's compute, 4..128)")


def options(args: argparse.Namespace, cat, profiles: list[str], devices: int = 0):
    """The typed options of ``args.strategy``, or None for its defaults."""
    name = args.strategy
    if name == "fedavg" and args.train_profiles:
        from broker_server.strategies import FedAvgOptions

        return FedAvgOptions(tuple(cat.get(p).name for p in args.train_profiles.split(",")))
    if name == "splitmix":
        from broker_server.strategies import SplitMixOptions

        sm = SplitMixOptions(args.splitmix_atom, budget_by_profile=_budgets(args, cat))
        try:
            sm.check()
        except ValueError as e:
            raise UsageError(f"--splitmix-atom/--budgets: {e}") from None
        return sm
    if name == "heterofl":
        from broker_server.strategies import HeteroFLOptions

        return HeteroFLOptions(width_by_profile=_budgets(args, cat))
    if name == "reft":
        from toolkit.reft import REFTOptions

        return REFTOptions(uplink=args.reft_uplink)
    if name == "signsgd":
        return _signsgd(args, cat, profiles, devices)
    if name == "ecofed":
        from toolkit.ecofed import EcoFedOptions

        return EcoFedOptions(period=args.period, split_after=args.split_after,
                             shared_tail=args.shared_tail)
    if name == "dpfl":
        from toolkit.dpfl import DPFLOptions

        return DPFLOptions(split_after=args.split_after)
    return None


def _budgets(args: argparse.Namespace, cat) -> dict[str, float]:
    out = {}
    for item in (args.budgets or "").split(","):
        if not item.strip():
            continue
        prof, eq, value = item.partition("=")
        try:
            b = float(value)
        except ValueError:
            b = -1.0
        if not eq or not 0 < b <= 1:
            raise UsageError(f"--budgets: expected profile=width with width in (0, 1], got "
                             f"{item!r}")
        out[cat.get(prof.strip()).name] = b
    return out


def _signsgd(args: argparse.Namespace, cat, profiles: list[str], devices: int):
    from broker_server.strategies import SignSGDOptions
    from toolkit.simulate import batch_by_compute

    if not args.server_lr_half_life >= 0:
        raise UsageError(f"--server-lr-half-life: expected >= 0 rounds (0: constant), got "
                         f"{args.server_lr_half_life}")
    if args.sign_estimate == "pairs" and args.sign_per_coordinate:
        raise UsageError("--sign-estimate pairs: estimates one weight per device; drop "
                         "--sign-per-coordinate")
    by_device = {}
    if args.batch_sizes:
        try:
            sizes = [int(b) for b in args.batch_sizes.split(",")]
        except ValueError:
            raise UsageError(f"--batch-sizes: expected integers, got {args.batch_sizes!r}") \
                from None
        if len(sizes) != devices or min(sizes) < 1:
            raise UsageError(f"--batch-sizes: expected {devices} positive sizes, got "
                             f"{len(sizes)}")
        by_device = {f"dev-{k}": b for k, b in enumerate(sizes)}
    return SignSGDOptions(args.sign_decoder, args.sign_per_coordinate, args.server_lr,
                          local_steps=args.local_steps, batch_by_device=by_device,
                          estimate=args.sign_estimate,
                          server_lr_half_life=args.server_lr_half_life,
                          batch_by_profile=batch_by_compute([cat.get(p) for p in profiles]))
