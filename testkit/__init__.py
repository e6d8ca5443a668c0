"""Helpers the tests and the benchmarks share (not shipped: not in pyproject's packages).

- ``testkit.timing``: ``time_scale()`` / ``scaled()``, the one factor every time limit in
  an end-to-end test is multiplied by, so a loaded machine slows a test, not fails it.
- ``testkit.brokers``: a private Mosquitto on a free port.
- ``testkit.field``: real ``fedge serve`` / ``fedge device`` processes for field tests.
- ``testkit.chunk_flood``: the flood of never-completing chunks and a tracemalloc meter.
- ``testkit.soak``, ``testkit.soak_check``, ``testkit.soak_report``: the soak (real
  processes under faults), its exactly-once checker and its figures.

tests/ and bench/ both import from here; neither imports the other.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: cwd and PYTHONPATH of subprocesses
