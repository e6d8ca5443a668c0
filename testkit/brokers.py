"""A real broker for the tests and benches: a private Mosquitto on a free port."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from broker_server.embedded import free_port
from testkit.timing import scaled


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts connections on host:port (``scaled(timeout)`` at most)."""
    deadline = time.time() + scaled(timeout)
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def _user_line(config_text: str = "") -> str:
    # Started as root, Mosquitto drops to user "mosquitto", which cannot read the
    # password and certificate files in pytest's private temp folders. A config that
    # names its user already (fedge secure init's) keeps it: a second is an error.
    if re.search(r"^user\s", config_text, re.M):
        return ""
    return "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""


class Mosquitto:
    """A private Mosquitto process; ``restart()`` keeps the port (for fault tests).

    By default it listens on 127.0.0.1 with the settings below; with ``config`` it runs
    that file's settings instead (e.g. ``fedge secure init``'s TLS listener, whose port
    must then be given), plus ``extra_conf`` and, as root, ``user root``."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "",
                 anonymous: bool = True, config: Path | None = None):
        if config is not None and port is None:
            raise ValueError("Mosquitto(config=...): give the port its listener uses")
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.anonymous = anonymous
        self.config = Path(config) if config is not None else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (.ci/run installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        if self.config is not None:
            text = self.config.read_text()
            conf.write_text(f"{text}\n{_user_line(text)}{self.extra_conf}")
        else:
            conf.write_text(f"listener {self.port} 127.0.0.1\n"
                            f"allow_anonymous {'true' if self.anonymous else 'false'}\n"
                            # no Nagle delay on small packets, as fedge secure's conf
                            f"persistence false\nset_tcp_nodelay true\n"
                            f"{_user_line()}{self.extra_conf}")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "mosquitto.log", "ab"))
        wait_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def restart(self, down_seconds: float = 1.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()
