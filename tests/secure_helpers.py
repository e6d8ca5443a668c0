"""Shared by the fedge secure tests: a fleet from ``fedge secure init`` on a real
Mosquitto, and ``Raw``, a bare paho client that sees CONNACK, SUBACK and PUBACK codes."""
from __future__ import annotations

import queue
import secrets
import ssl
import threading
import time

import paho.mqtt.client as paho

from device_runtime.credentials import Credentials
from testkit.brokers import Mosquitto, wait_port
from testkit.timing import scaled
from tests.conftest import run_fedge

JOB = "sec"
CLIENTS = ("aggregator", "dev-0", "dev-1")


def start_fleet(root, *args: str, devices=("dev-0", "dev-1")):
    """``fedge secure init`` on two free ports and a Mosquitto running its config:
    (DIR, broker, the aggregator's port)."""
    from broker_server.embedded import free_port

    port, agg_port = free_port(), free_port()
    code, out, err = run_fedge("secure", "init", "--devices", *devices, "--out",
                               str(root / "sec"), "--port", str(port), "--aggregator-port",
                               str(agg_port), *args)
    assert code == 0, err
    assert f"mosquitto -c {root / 'sec' / 'mosquitto.conf'}" in out
    assert f"--broker mqtts://HOST:{agg_port} --credentials" in out
    m = Mosquitto(root / "mosq", port=port, config=root / "sec" / "mosquitto.conf").start()
    wait_port("127.0.0.1", agg_port)
    return root / "sec", m, agg_port


def module_fleet(tmp_path_factory):
    """``fedge secure init`` for dev-0 and dev-1, and a Mosquitto running its config:
    (DIR, broker, the aggregator's port). A test module makes it its fixture:
    ``fleet = pytest.fixture(scope="module", name="fleet")(module_fleet)``."""
    f = start_fleet(tmp_path_factory.mktemp("secure"), "--host", "10.1.2.3")
    yield f
    f[1].stop()


def creds_of(fleet, client: str) -> Credentials:
    return Credentials.load(fleet[0] / "credentials" / f"{client}.json")


class Raw:
    """A bare paho client on the TLS listener, to see CONNACK, SUBACK and PUBACK codes."""

    def __init__(self, fleet, client: str | None, *, cert: bool = True,
                 password: str | None = None, tls: bool = True,
                 protocol: int = paho.MQTTv311, ca=None, as_cert: str | None = None,
                 port: int | None = None, client_id: str | None = None):
        """``client``'s credentials (its username and password), with ``as_cert``'s
        certificate if given; on the aggregator's listener for the aggregator, else on
        the devices' (or ``port``)."""
        self.connack: str | None = None
        self.subacks: list[str] = []
        self.pubacks: dict[int, str] = {}
        self.messages: queue.Queue = queue.Queue()
        self.disconnects = 0
        self._connected = threading.Event()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=protocol,
                        client_id=client_id or f"raw-{secrets.token_hex(3)}")
        creds = creds_of(fleet, client or "dev-0")
        if tls:
            ctx = ssl.create_default_context(cafile=str(ca or creds.ca))
            if cert:
                mine = creds_of(fleet, as_cert) if as_cert else creds
                ctx.load_cert_chain(str(mine.cert), str(mine.key))
            c.tls_set_context(ctx)
        if client:
            c.username_pw_set(creds.username, password or creds.password)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda cl, u, mid, codes, p=None: self.subacks.extend(map(str, codes))
        c.on_publish = lambda cl, u, mid, rc, p=None: self.pubacks.__setitem__(mid, str(rc))
        c.on_message = lambda cl, u, msg: self.messages.put((msg.topic, msg.payload))
        c.on_disconnect = self._on_disconnect
        c.reconnect_delay_set(0.1, 0.1)  # loop_stop waits out paho's retry delay
        self.c = c
        if port is None:
            port = fleet[2] if client == "aggregator" else fleet[1].port
        try:
            c.connect("localhost", port)
        except (OSError, ssl.SSLError):
            return
        c.loop_start()
        self._connected.wait(scaled(5))
        if self.connack != "Success":
            self.close()  # paho would keep retrying

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        self.connack = str(reason_code)
        self._connected.set()

    def _on_disconnect(self, *args) -> None:
        self.disconnects += 1
        self._connected.set()  # refused during the handshake

    def subscribe(self, *patterns: str) -> list[str]:
        """SUBACK codes, in order."""
        for p in patterns:
            self.c.subscribe(p, 1)
        wait_for(lambda: len(self.subacks) == len(patterns), "SUBACKs")
        return list(self.subacks)

    def publish(self, topic: str, payload: bytes) -> str:
        """The PUBACK's reason."""
        info = self.c.publish(topic, payload, qos=1)
        wait_for(lambda: info.mid in self.pubacks, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def received(self) -> list[tuple[str, bytes]]:
        out = []
        while not self.messages.empty():
            out.append(self.messages.get())
        return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def wait_for(predicate, what: str, timeout: float = 5.0) -> None:
    deadline = time.time() + scaled(timeout)
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
