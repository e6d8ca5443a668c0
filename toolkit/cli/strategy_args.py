"""The strategies' command-line options, shared by ``fedge simulate`` and ``fedge serve``:
every strategy's flags (from its spec, ``toolkit.strategies``), turned into the chosen
strategy's typed options (the rest is filled in from the fleet by
``toolkit.strategies.setups.setup_strategy``)."""
from __future__ import annotations

import argparse

from toolkit import strategies
from toolkit.strategies.spec import PAPER


def name_args(p: argparse.ArgumentParser) -> None:
    """--strategy and --codec, their valid names in the help (checked when used, with a
    one-line error listing them)."""
    from device_runtime import codecs

    p.add_argument("--strategy", default="fedavg",
                   help=f"one of {', '.join(strategies.names())}")
    p.add_argument("--codec", default="fp32", help="how updates travel: one of "
                   f"{', '.join(codecs.CODECS.names())}")


def add(p: argparse.ArgumentParser) -> None:
    """Each strategy's flags, a flag shared by several strategies once, grouped by the
    strategies that read them."""
    users: dict[int, tuple[strategies.Flag, list[str]]] = {}
    for name in strategies.TABLE.in_order():
        for flag in strategies.spec(name).flags:
            users.setdefault(id(flag), (flag, []))[1].append(name)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, names in users.values():
        title = " / ".join(names)
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        groups[title].add_argument(*flag.names, **flag.kwargs)


def options(args: argparse.Namespace, cat, profiles: list[str], devices: int = 0,
            per_round: int = 0):
    """The typed options of ``args.strategy``, or None for its defaults; a robust or
    vote-cap flag the strategy does not read is a UsageError."""
    from toolkit.strategies.robust import refuse_unused

    spec = strategies.get(args.strategy)
    refuse_unused(args, args.strategy, spec.flags)
    if getattr(args, "paper", False) and PAPER not in spec.flags:
        from toolkit.errors import UsageError

        have = [n for n in strategies.names() if PAPER in strategies.spec(n).flags]
        raise UsageError(f"--paper: strategy {args.strategy} has no paper mode (these do: "
                         f"{', '.join(have) or 'none'})")
    if spec.from_args is None:
        return None
    return spec.from_args(args, strategies.ArgsContext(cat, profiles, devices,
                                                       per_round or devices))
