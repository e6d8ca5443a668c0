"""The ``fedge`` command: subcommands, and the one place errors become exit codes.

Every subcommand lives in a small module with ``add(subparsers)`` that sets
``func``; its heavy imports happen inside ``func`` so that device commands run
with only ``fedge[device]`` installed. A ``FedgeError`` prints one line and
exits with its ``exit_code``; argument mistakes exit 2, also on one line.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import os
import sys

from device_runtime import heap, threads
from device_runtime.errors import EXIT_USAGE, FedgeError


class _Help(argparse.HelpFormatter):
    """--help names every option's default (not the empty ones: None, False, "")."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None, **kwargs) -> None:
        # argparse builds a formatter for every add_argument, and its own width lookup
        # imports shutil (with zlib, bz2, lzma): 0.6 MB and ~5 ms of a device's start.
        super().__init__(prog, indent_increment, max_help_position,
                         _columns() - 2 if width is None else width, **kwargs)

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        d = action.default  # by identity: 0 == False, and 0 is a default worth showing
        return bool(action.option_strings) and action.nargs != 0 and not (
            d is None or d is False or d is argparse.SUPPRESS or d == "")

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # argparse skips help-less ones
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not self._shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` gives it: $COLUMNS, else
    stdout's terminal, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, not usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# Which module defines each subcommand, in ``fedge --help`` order. A known command
# builds only its own module's parser: ``fedge infer`` on a device then imports
# neither the strategy table nor the server's argument modules (start-up time).
MODULES = {"profiles": "data_cmds", "partition": "data_cmds", "pretrain": "model_cmds",
           "export": "model_cmds", "infer": "device_cmds", "device": "agent_cmds",
           "serve": "field_cmds", "demo": "field_cmds", "worker": "field_cmds",
           "rollout": "rollout_cmds", "simulate": "sim_cmds", "bundle": "deploy_cmds",
           "wheelhouse": "deploy_cmds", "secure": "secure_cmds", "audit": "audit_cmds",
           "dashboard": "dashboard_cmds"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``fedge`` parser: every subcommand, or only ``command``'s module's."""
    import importlib

    parser = _Parser(prog="fedge", description="Federated learning and inference on "
                     "fleets of small devices.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    names = [MODULES[command]] if command in MODULES else list(dict.fromkeys(MODULES.values()))
    for name in names:
        importlib.import_module(f"toolkit.cli.{name}").add(sub)
    return parser


# Commands that run an aggregator (or its workers): they keep more freed heap for the
# next round's buffers than a device does (device_runtime/heap.py).
SERVER_SIDE = frozenset({"serve", "demo", "worker", "simulate"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        threads.configure()  # before anything imports torch
        if args.command not in QUICK_EXIT:  # one sample's inference reuses no buffers
            heap.keep_freed(heap.SERVER_RETAIN if args.command in SERVER_SIDE
                            else heap.DEVICE_RETAIN)
        code = args.func(args)
    except FedgeError as e:
        print(f"fedge {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"fedge {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


# Commands whose process may end without the interpreter's teardown (every module's
# cleanup, numpy's and ONNX Runtime's destructors), which cost ``fedge infer`` of one
# sample 40-70 ms of CPU on top of about 0.25 s (docs/results/startup.md). Only commands
# that leave it nothing to do: no threads of their own, every file they write closed
# (and the ledger fsynced) before they return.
QUICK_EXIT = frozenset({"infer"})


def console() -> int:
    """The ``fedge`` console script and ``python -m toolkit``: ``main`` on sys.argv; after
    a QUICK_EXIT command, the atexit handlers run and the streams are flushed as at any
    exit, then the process ends without the teardown (``os._exit``)."""
    argv = sys.argv[1:]
    code = main(argv)
    if argv and argv[0] in QUICK_EXIT:
        _quick_exit(code)
    return code


def _quick_exit(code: int) -> None:
    """``os._exit(code)`` once what an exit must do is done; returns (for the ordinary
    exit) where that cannot be vouched for: another thread still running, or no
    ``atexit._run_exitfuncs`` on this Python."""
    threading = sys.modules.get("threading")
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None or (threading is not None and threading.active_count() > 1):
        return
    run_exitfuncs()  # e.g. coverage's data file, a weakref.finalize's clean-up
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: the interpreter's exit reports it
        return
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console())
