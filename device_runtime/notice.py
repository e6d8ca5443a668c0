"""Status lines for a wait: said when the wait starts, then every ~10 s while it lasts.

A user watching ``fedge serve`` with no devices yet, or ``fedge device`` retrying a
broker, should see what it waits for rather than silence (``Notice(log.warning)``).
A wait is named by a key: a new key is said at once, the same key again only after
``every`` seconds.
"""
from __future__ import annotations

import time
from typing import Callable

EVERY = 10.0  # seconds between two lines about the same wait


class Notice:
    """``notice(key, text)``: ``say(text)`` if ``key`` is a new wait or ``every`` seconds
    passed since the last line; ``say`` None: silent."""

    def __init__(self, say: Callable[[str], None] | None, every: float = EVERY,
                 clock: Callable[[], float] = time.monotonic):
        self.say, self.every, self.clock = say, every, clock
        self._key: str | None = None
        self._at = 0.0

    def __call__(self, key: str, text: str) -> None:
        if self.say is None:
            return
        now = self.clock()
        if key != self._key or now - self._at >= self.every:
            self._key, self._at = key, now
            self.say(text)

    def end(self) -> None:
        """The wait is over: the next one is said at once, even with the same key."""
        self._key = None
