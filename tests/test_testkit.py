"""The tests' time scale: one factor from FEDGE_TEST_TIME_SCALE, or from the load, never below 1."""
from __future__ import annotations

import os

import pytest

from testkit import timing


def _fresh(monkeypatch, value: str | None) -> float:
    if value is None:
        monkeypatch.delenv(timing.ENV, raising=False)
    else:
        monkeypatch.setenv(timing.ENV, value)
    return timing.time_scale.__wrapped__()  # the cached value is the session's, not this one


def test_the_environment_sets_the_factor_and_a_bad_value_names_it(monkeypatch):
    assert _fresh(monkeypatch, "2.5") == 2.5
    for bad in ("fast", "0.5", "nan"):
        with pytest.raises(ValueError, match=f"{timing.ENV}: expected a number >= 1, got"):
            _fresh(monkeypatch, bad)


def test_unset_it_follows_the_load_per_cpu_and_never_goes_below_one(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (8.0, 2.0, 1.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert _fresh(monkeypatch, None) == 4.0
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.3, 0.2))
    assert _fresh(monkeypatch, None) == 1.0
    assert timing.scaled(10) == 10 * timing.time_scale()
