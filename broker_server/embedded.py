"""The embedded broker: amqtt in this process, on a free loopback port.

With no ``--broker``, fedge starts one so that a laptop needs nothing else. It
runs its own asyncio loop in a daemon thread; ``url`` is what clients connect to.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading

from broker_server.errors import BrokerServerError


LOGGERS = ("amqtt", "transitions")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """``with EmbeddedBroker() as b: ... b.url``: an MQTT 3.1.1 broker, anonymous, loopback."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 log_file: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        # amqtt's own warnings and tracebacks go here instead of the console (a user
        # watching a demo's table should not read a broker's internal error in it)
        self.log_file = log_file
        self._handler: logging.Handler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        for name in ("amqtt", "transitions"):  # amqtt logs every packet at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self._loop = asyncio.new_event_loop()
        if self.log_file:
            self._handler = logging.FileHandler(self.log_file)
            self._handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
            for name in LOGGERS:
                logging.getLogger(name).addHandler(self._handler)
                logging.getLogger(name).propagate = False
            # an exception in one of amqtt's tasks: its log, not asyncio's stderr line
            self._loop.set_exception_handler(lambda loop, ctx: logging.getLogger(
                "amqtt").error("%s", ctx.get("message"), exc_info=ctx.get("exception")))
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="amqtt-broker")
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            fut.result(timeout)
        except Exception as e:
            self.stop()
            raise BrokerServerError(f"embedded broker failed to start on "
                                    f"{self.host}:{self.port}: {e}") from None
        return self

    async def _start(self) -> None:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }
        self._broker = Broker(config)
        await self._broker.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None:
            return
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(),
                                                 self._loop).result(timeout)
            except Exception:
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._loop, self._broker = None, None
        if self._handler is not None:
            for name in LOGGERS:
                logging.getLogger(name).removeHandler(self._handler)
                logging.getLogger(name).propagate = True
            self._handler.close()
            self._handler = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
