"""fedge processes keep freed heap for the next message's buffers (device_runtime/heap.py):
a round's model-sized buffers reuse the last round's pages instead of faulting them in
again. Measured in a fresh interpreter each, by its own page-fault count."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from device_runtime import heap
from testkit import ROOT

# Six 1 MiB buffers made and dropped 40 times, as a round's frames and copies are.
_CHURN = """
import json, resource, sys
from device_runtime import heap
applied = heap.keep_freed(int(sys.argv[1])) if int(sys.argv[1]) else False
def burst():
    held = [bytearray(1 << 20) for _ in range(6)]
    for b in held:
        b[::4096] = b"x" * len(b[::4096])  # every page touched, as a frame's bytes are
burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    burst()
print(json.dumps({"applied": applied,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _churn(retain: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHURN, str(retain)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    default, kept = _churn(0), _churn(heap.DEVICE_RETAIN)
    if not kept["applied"]:
        pytest.skip("not glibc: there is no mallopt to tune")
    pages = 40 * 6 * (1 << 20) // 4096  # what faulting every buffer in again costs
    assert default["faults"] > pages // 2, default  # glibc's default gives them back
    assert kept["faults"] < pages // 20, kept


def test_every_fedge_command_keeps_freed_heap(monkeypatch):
    from toolkit.cli import main as cli

    kept: list[int] = []
    monkeypatch.setattr(heap, "keep_freed", kept.append)
    assert cli.main(["profiles"]) == 0
    assert kept == [heap.DEVICE_RETAIN]
    assert {"serve", "demo", "worker", "simulate"} <= cli.SERVER_SIDE


_GIVE_BACK = """
import json
from device_runtime import heap
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
applied = heap.keep_freed(heap.SERVER_RETAIN)
before = rss()
held = [bytearray(b"x" * (1 << 20)) for _ in range(32)]
del held
kept = rss() - before
heap.give_back()
print(json.dumps({"applied": applied, "kept": kept, "after": rss() - before}))
"""


def test_the_heap_kept_is_given_back_when_asked():
    """The aggregator records a round's RSS after ``give_back``: what is live, not the
    32 MiB of buffers the heap kept for the next round."""
    out = json.loads(subprocess.run([sys.executable, "-c", _GIVE_BACK], cwd=ROOT,
                                    capture_output=True, text=True, timeout=120,
                                    check=True).stdout)
    if not out["applied"]:
        pytest.skip("not glibc: there is no mallopt to tune")
    assert out["kept"] > 24 << 20, out  # kept for reuse
    assert out["after"] < 8 << 20, out  # and given back
