"""Reconnection policy: exponential backoff with full jitter, reset after success."""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of ``base * 2**attempt`` capped at ``cap``, each drawn uniformly in
    [0, delay] ("full jitter"), so a fleet that lost its broker does not
    reconnect in lockstep when it comes back."""

    base: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
