"""One factor for every time limit in the tests, so a loaded machine slows them, not fails them.

An end-to-end test waits for real processes (``fedge serve``, ``fedge device``,
Mosquitto) with upper bounds: a round timeout, an idle timeout, how long to wait for
a process to exit. On a quiet machine those bounds are generous; on one shared with
other test runs they were not (a device idling out while the server trained alone).
Each such bound is written as ``scaled(seconds)``.

``FEDGE_TEST_TIME_SCALE`` sets the factor (a float >= 1, e.g. ``3`` on a slow CI box).
Unset, it is derived once from the load when first asked: the larger of the 1- and
5-minute load averages per CPU, never below 1 (a 2-core machine at load 4 waits twice
as long). Only what the tests pass is scaled; the product's defaults are not touched.
"""
from __future__ import annotations

import functools
import os

ENV = "FEDGE_TEST_TIME_SCALE"


@functools.cache
def time_scale() -> float:
    """The factor (>= 1) every time limit in an end-to-end test is multiplied by."""
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{ENV}: expected a number >= 1, got {raw!r}") from None
        if not value >= 1.0:
            raise ValueError(f"{ENV}: expected a number >= 1, got {raw!r}")
        return value
    try:
        load = max(os.getloadavg()[:2])
    except (AttributeError, OSError):  # no load average on this platform
        return 1.0
    return max(1.0, load / (os.cpu_count() or 1))


def scaled(seconds: float) -> float:
    """``seconds`` times ``time_scale()``: an upper bound on a wait, never a lower one."""
    return seconds * time_scale()
