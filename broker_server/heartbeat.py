"""The aggregator's heartbeat: a signed ``Heartbeat`` on ``heartbeat`` every ~10 s while
the job runs, from its own thread, so that it goes out while the main loop is busy
(EcoFed's server training, an evaluation, a long fold). A device waiting for a task
counts its idle timeout from the last message it got, heartbeats included: "server
busy" is not "job gone". Bound to the run's session like a stop (docs/protocol.md).
"""
from __future__ import annotations

import threading
import time

from device_runtime import messages
from device_runtime.notice import EVERY


class Heartbeat:
    """``with Heartbeat(agg):`` the aggregator's rounds; one beat at once, then every
    ``every`` seconds until the block ends."""

    def __init__(self, agg, every: float = EVERY):
        self.agg, self.every = agg, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")

    def beat(self) -> None:
        agg = self.agg
        msg = messages.Heartbeat(completed=agg.state.completed, ts=time.time())
        agg.t.publish(agg.topics.heartbeat, agg.trust.seal(msg, nonce=agg.trust.session))

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # a broker hiccup: the next beat tries again
                pass
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
