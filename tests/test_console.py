"""Round progress: plain lines off a terminal (logs, pipes), rich's table and bar on one."""
from __future__ import annotations

import io

import pytest

from toolkit.console import RoundProgress

REC = {"accuracy": 0.5, "uplink_bytes": 1234, "downlink_bytes": 5678,
       "devices_reporting": 3, "devices_assigned": 4, "seconds": 1.5}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_round_is_one_plain_line():
    out = io.StringIO()
    with RoundProgress(2, out) as p:
        for r in (1, 2):
            p({"round": r, **REC})
    lines = out.getvalue().splitlines()
    assert lines == [f"round {r}/2  accuracy 0.5000  uplink B 1,234  downlink B 5,678  "
                     "devices 3/4  seconds 1.50" for r in (1, 2)]


def test_on_a_terminal_rich_draws_the_rows_and_the_bar():
    pytest.importorskip("rich")
    out = _Terminal()
    with RoundProgress(2, out, extra=lambda rec: "cpu 1.0 s") as p:
        for r in (1, 2):
            p({"round": r, **REC})
    text = out.getvalue()
    assert "\x1b[" in text and "2/2" in text and "5,678" in text and "cpu" in text
