"""Round progress on the console: rich on a terminal, plain lines anywhere else.

``fedge demo``, ``fedge serve`` and ``fedge simulate`` print one row per closed round
(accuracy, bytes, devices, seconds). On a terminal the rows are a rich table drawn
as they come, under a live progress bar with the elapsed time and an estimate of
what is left; piped to a file or a log (systemd, CI, a test) each round is one plain
line with the same columns and ``round r/R`` in front, so a log stays greppable and
free of control characters. Without rich installed (a device's base install) the
plain lines are used everywhere.
"""
from __future__ import annotations

import sys
from typing import IO

COLUMNS = ("round", "accuracy", "uplink B", "downlink B", "devices", "seconds")


def _cells(rec: dict) -> list[str]:
    acc = rec.get("accuracy")
    return [str(rec["round"]), "-" if acc is None else f"{acc:.4f}",
            f"{rec['uplink_bytes']:,}", f"{rec['downlink_bytes']:,}",
            f"{rec['devices_reporting']}/{rec.get('devices_assigned', '?')}",
            f"{rec['seconds']:.2f}"]


def use_rich(stream: IO) -> bool:
    """rich only on a terminal (and only if it is installed)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return hasattr(stream, "isatty") and stream.isatty()


class RoundProgress:
    """``progress(record)`` after each round; ``close()`` when the job ends (or use it
    as a context manager). ``extra(record)`` adds a column's text (e.g. the
    aggregator's CPU time in ``fedge simulate``)."""

    def __init__(self, rounds: int, stream: IO | None = None, title: str = "rounds",
                 extra=None):
        self.rounds, self.extra = rounds, extra
        self.stream = stream or sys.stdout
        self.done = 0
        self._live = None
        if use_rich(self.stream):
            self._start_rich(title)

    def _start_rich(self, title: str) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._console = Console(file=self.stream)
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  TimeRemainingColumn(), console=self._console,
                                  transient=False)
        self._task = self._progress.add_task(title, total=self.rounds)
        self._progress.start()
        self._live = True
        self._header = False

    def __call__(self, rec: dict) -> None:
        self.done = rec["round"]
        cells = _cells(rec)
        extra = self.extra(rec) if self.extra else ""
        if not self._live:
            print(f"round {self.done}/{self.rounds}  " + "  ".join(
                f"{name} {value}" for name, value in zip(COLUMNS[1:], cells[1:]))
                + (f"  {extra}" if extra else ""), file=self.stream, flush=True)
            return
        from rich.table import Table

        # One table per row, same widths: rows print above the live bar as they come.
        table = Table(show_header=not self._header, box=None, pad_edge=False)
        for name in COLUMNS + (("",) if extra else ()):
            table.add_column(name, justify="right", min_width=max(len(name), 9))
        table.add_row(*cells, *([extra] if extra else []))
        self._header = True
        self._progress.console.print(table)
        self._progress.update(self._task, completed=min(self.done, self.rounds))

    def note(self, text: str) -> None:
        """A status line (what the job waits for) above the bar, or a plain line."""
        if self._live:
            self._progress.console.print(text, style="dim")
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._live:
            self._progress.stop()
            self._live = False

    def __enter__(self) -> "RoundProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
