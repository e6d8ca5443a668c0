"""fsync off the aggregator's thread: accepted updates made durable in groups.

An fsync waits for a disk commit (about 4 ms each on this machine's disk, two per
update: the file and its folder). On the aggregator's thread they were the largest
part of a round's own time at 16 devices (docs/results/field.md). The aggregator now
hands each handled burst's files to a ``Syncer`` and goes on; the syncer's thread
fsyncs everything handed to it since its last pass, each file once, then their
folders. A SIGKILL loses nothing (the page cache outlives the process); a power cut
can lose the updates not yet synced, those of the last few milliseconds, whose
devices are asked again like any device that has not reported (as before, for the
last burst). ``flush`` waits until everything handed over so far is on disk.

The same thread removes what a closed round left (its saved updates, the global model
before it): files the durable state.json no longer names, so when they go does not
matter, but unlinking a round's updates took 4 ms of each round's close (ext4, 16
devices) on the aggregator's thread, before the next round's tasks could go out.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

log = logging.getLogger("fedge.server")


def fsync_paths(paths: list[Path]) -> None:
    """fsync each path once, in order; one removed meanwhile (its round closed) is
    skipped, any other failure is logged (a thread has no caller to raise to)."""
    for path in dict.fromkeys(paths):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        except OSError as e:
            log.error("state: cannot open %s to make it durable: %s", path, e)
            continue
        try:
            os.fsync(fd)
        except OSError as e:
            log.error("state: fsync of %s failed: %s", path, e)
        finally:
            os.close(fd)


def remove_paths(paths: list[Path]) -> None:
    """Remove each file or folder (a folder with what it holds); one already gone is
    fine, any other failure is logged."""
    for path in paths:
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            continue
        except OSError as e:
            log.error("state: cannot remove %s (no longer needed): %s", path, e)


class Syncer:
    """A thread that fsyncs the files handed to it, and removes the ones it is told to
    (started on first use)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queue: list[Path] = []
        self._removals: list[Path] = []
        self._handed = self._done = 0  # hand-overs so far, and synced so far
        self._thread: threading.Thread | None = None

    def submit(self, files: list[Path]) -> None:
        """Make ``files`` durable soon, then their folders; returns at once."""
        if not files:
            return
        with self._cv:
            self._queue += [*files, *dict.fromkeys(p.parent for p in files)]
            self._handed_over()

    def remove(self, paths: list[Path]) -> None:
        """Remove ``paths`` (files or folders) soon, after the fsyncs handed over before
        them; returns at once. ``flush`` waits for this too."""
        if not paths:
            return
        with self._cv:
            self._removals += paths
            self._handed_over()

    def _handed_over(self) -> None:
        self._handed += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fedge-fsync",
                                            daemon=True)
            self._thread.start()
        self._cv.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is synced (False: ``timeout`` passed)."""
        with self._cv:
            target = self._handed
            return self._cv.wait_for(lambda: self._done >= target, timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._queue or self._removals))
                batch, self._queue, upto = self._queue, [], self._handed
                removals, self._removals = self._removals, []
            fsync_paths(batch)
            remove_paths(removals)
            with self._cv:
                self._done = upto
                self._cv.notify_all()
