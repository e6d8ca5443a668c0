"""--help tells a user what they would get: every option with a default names it, and
the options that take a registered name list the valid ones."""
from __future__ import annotations

import argparse

from toolkit.cli.main import build_parser


def _subparsers(parser: argparse.ArgumentParser | None = None,
                prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its command line, nested ones (``secure init``)
    included."""
    parser = parser or build_parser()
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, p in a.choices.items():
                out[f"{prefix}{name}"] = p
                out.update(_subparsers(p, f"{prefix}{name} "))
    return out


def test_nested_commands_are_covered():
    assert {"secure init", "secure add", "secure revoke"} <= set(_subparsers())


def test_every_option_with_a_default_shows_it_in_help():
    missing = []
    for name, p in _subparsers().items():
        text = " ".join(p.format_help().split()).replace("- ", "-")  # argparse's wrap
        for a in p._actions:
            d = a.default
            if not a.option_strings or a.nargs == 0 or d is None or d is False \
                    or d == "" or d is argparse.SUPPRESS:
                continue
            # the option's help line ends with its default, however argparse wraps it
            if f"default: {d}" not in text and f"default {d}" not in text:
                missing.append(f"{name} {a.option_strings[0]}={d!r}")
    assert not missing, missing


def test_names_options_list_the_valid_names():
    from device_runtime import codecs
    from toolkit import strategies

    for cmd in ("simulate", "serve"):
        text = " ".join(_subparsers()[cmd].format_help().split()).replace("- ", "-")
        assert all(n in text for n in strategies.names()), cmd
        assert all(n in text for n in codecs.CODECS.names()), cmd
    text = " ".join(_subparsers()["wheelhouse"].format_help().split())
    from toolkit.deploy.wheelhouse import TARGETS

    assert all(t in text for t in TARGETS)


def test_options_with_fixed_choices_list_them():
    missing = []
    for name, p in _subparsers().items():
        text = " ".join(p.format_help().split()).replace("- ", "-")
        for a in p._actions:
            if a.option_strings and a.choices and not isinstance(
                    a, argparse._SubParsersAction):
                missing += [f"{name} {a.option_strings[0]} {c}" for c in a.choices
                            if str(c) not in text]
    assert not missing, missing
