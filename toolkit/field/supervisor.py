"""``fedge serve --workers``: the local worker processes, kept running for the job.

A worker that exits mid-job (killed, out of memory) is started again with the same
id, state dir and MQTT client id. Its persistent session brings what the broker
queued for it while it was down, it reloads the updates it had accepted from its
state dir when the round's model arrives, and it answers the close as if it had
never gone, so no update it reported is lost. A restart waits a backoff delay
(exponential with jitter, reset once the worker has run ``stable`` seconds); a
worker that exits ``max_restarts`` times in a row ends the job, naming its log.
Before the first round an exit is an error at once: a worker that cannot come up
at all has a setup problem (credentials, broker), which restarting will not fix.

The checks run on the aggregator's thread (``Aggregator.watch``, between waits for
messages), so no thread of its own and no shared state.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from broker_server.errors import BrokerServerError
from device_runtime.backoff import Backoff

log = logging.getLogger("fedge.server")
MAX_RESTARTS = 5  # in a row, per worker
STABLE = 30.0  # seconds up after which a worker's restarts and backoff start over


@dataclass
class _Slot:
    name: str
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    in_a_row: int = 0  # restarts since it last ran ``stable`` seconds
    due: float | None = None  # while it is down: when its restart is due
    backoff: Backoff = field(default_factory=Backoff)


class Supervisor:
    """Starts the worker commands and restarts the ones that exit mid-job."""

    def __init__(self, workers: dict[str, list[str]], logs: dict[str, Path],
                 max_restarts: int = MAX_RESTARTS, stable: float = STABLE,
                 clock: Callable[[], float] = time.monotonic,
                 env: dict[str, str] | None = None):
        self.env = dict(os.environ if env is None else env)  # the workers' (their threads)
        self.slots = [_Slot(name, cmd, logs[name]) for name, cmd in workers.items()]
        self.max_restarts, self.stable, self.clock = max_restarts, stable, clock
        self.restarts = 0  # over the job, for the report

    @property
    def procs(self) -> list[subprocess.Popen]:
        return [s.proc for s in self.slots if s.proc is not None]

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def check_started(self) -> None:
        """Before the first round: a worker that exited is an error."""
        for s in self.slots:
            if s.proc is not None and s.proc.poll() is not None:
                raise BrokerServerError(f"worker process {s.proc.pid} ({s.name}) exited with "
                                        f"code {s.proc.returncode} before the first round; "
                                        f"see {s.log_path}")

    def check(self) -> None:
        """During the job: restart the workers that exited, once their delay is over."""
        now = self.clock()
        for s in self.slots:
            if s.due is not None:
                if now >= s.due:
                    s.due = None
                    self._spawn(s)
                continue
            code = s.proc.poll()
            if code is None:
                if s.in_a_row and now - s.started >= self.stable:
                    s.in_a_row = 0
                    s.backoff.reset()
                continue
            if s.in_a_row >= self.max_restarts:
                raise BrokerServerError(f"worker {s.name} exited {s.in_a_row + 1} times in "
                                        f"a row (last code {code}); see {s.log_path}")
            s.in_a_row += 1
            self.restarts += 1
            delay = s.backoff.next_delay()
            s.due = now + delay
            log.warning("worker %s (pid %d) exited with code %d: restarting in %.1fs "
                        "(%d of %d in a row)", s.name, s.proc.pid, code, delay, s.in_a_row,
                        self.max_restarts)

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the workers to stop on "done"; terminate the ones that do not."""
        for s in self.slots:
            s.due = None
            if s.proc is None:
                continue
            try:
                s.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                s.proc.terminate()
                s.proc.wait(5)

    def _spawn(self, s: _Slot) -> None:
        with open(s.log_path, "ab") as out:  # the child keeps its own descriptor
            s.proc = subprocess.Popen(s.cmd, stdout=out, stderr=subprocess.STDOUT,
                                      env=dict(self.env, PYTHONUNBUFFERED="1"))
        s.started = self.clock()


__all__ = ["Supervisor", "MAX_RESTARTS", "STABLE"]
