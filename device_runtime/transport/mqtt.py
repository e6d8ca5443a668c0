"""MQTT transport over paho-mqtt: QoS 1, last will, persistent sessions, reconnects.

The network loop runs in our own thread rather than paho's ``loop_start`` so
that reconnection follows ``Backoff`` (exponential with jitter, reset on
success); it alone reads and writes the socket (a publish from another thread is
queued and wakes it: one TLS connection must not be used by two threads).
Subscriptions are renewed on every connect; QoS 1 messages published while
disconnected stay in paho's queue and go out after the reconnect.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import paho.mqtt.client as paho

from device_runtime.backoff import Backoff
from device_runtime.notice import Notice
from device_runtime.transport.base import DEFAULT_MAX_PAYLOAD, Transport
from device_runtime.transport.url import BrokerURL, TransportError

log = logging.getLogger("fedge.transport")
SLOW_CONNECT = 2.0  # seconds of a first connect before it is said what it waits for

# CONNACK reasons that retrying cannot fix (MQTT 5 codes; paho maps 3.1.1's to them):
# client id not valid, bad user name or password, not authorized, banned, bad auth method
_DENIED = frozenset({133, 134, 135, 138, 140})


class MqttTransport(Transport):
    def __init__(self, url: BrokerURL | str, client_id: str, *,
                 max_payload: int = DEFAULT_MAX_PAYLOAD,
                 will: tuple[str, bytes] | None = None, persistent: bool = False,
                 backoff: Backoff | None = None, keepalive: int = 15,
                 ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, username: str | None = None,
                 password: str | None = None, loop_timeout: float = 0.1):
        super().__init__(client_id, max_payload)
        self.url = BrokerURL.parse(url) if isinstance(url, str) else url
        self.backoff = backoff or Backoff()
        self.keepalive = keepalive
        # How long one network-loop pass may wait on the socket. paho wakes the loop for a
        # publish from another thread, so a longer wait costs no latency, only less idle
        # CPU: ``fedge simulate --procs`` runs hundreds of clients per process.
        self.loop_timeout = loop_timeout
        self._patterns: set[str] = set()
        self._connected = threading.Event()
        # A CONNACK came once: connect() is done even if the link dropped since (a client
        # knocked off at once by another of the same id would otherwise never "connect")
        self._accepted = threading.Event()
        self._stop = threading.Event()
        self._refused: str | None = None
        self._denied = threading.Event()  # the broker refused these credentials
        self._thread: threading.Thread | None = None
        self._pending: list[paho.MQTTMessageInfo] = []
        self._pending_lock = threading.Lock()
        self._pending_mark = 64  # forget the acknowledged ones when the list passes this
        # mids whose PUBACK arrived, until their info leaves _pending (see _acked); set.add
        # and .discard are atomic, and paho calls on_publish holding its own lock.
        self._acked_mids: set[int] = set()
        # SUBSCRIBE mids sent, and those the broker granted (a SUBACK may be handled on the
        # network thread before subscribe() returns its mid, hence two sets)
        self._sub_sent: set[int] = set()
        self._sub_acked: set[int] = set()
        self.reconnects = 0
        self.notice = Notice(log.warning)  # what a slow connect or a reconnect waits for
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                        clean_session=not persistent, protocol=paho.MQTTv311)
        c.max_queued_messages_set(0)  # unbounded: nothing accepted is dropped
        c.max_inflight_messages_set(64)
        user = username or self.url.username
        if user:
            c.username_pw_set(user, password or self.url.password)
        if self.url.tls or ca_file:
            c.tls_set_context(_tls_context(ca_file, cert_file, key_file))
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_message = lambda client, userdata, msg: self._deliver(msg.topic, msg.payload)
        c.on_publish = lambda client, userdata, mid, rc, props: self._acked_mids.add(mid)
        c.on_subscribe = lambda client, userdata, mid, codes, props: self._sub_acked.add(mid)
        # Every write on the network thread. Without paho's own thread (loop_start) or
        # this callback, paho writes a publish (subscribe, disconnect) from the calling
        # thread while the network thread reads: two threads in one OpenSSL connection,
        # which broke TLS records ("decryption failed or bad record mac": the broker
        # dropped the client) and once the heap ("free(): corrupted unsorted chunks").
        # With it, paho queues the packet and calls it (_write_soon).
        c.on_socket_register_write = self._write_soon
        c.on_socket_open = _no_delay
        self._closing = threading.Event()  # close(): the DISCONNECT is on its way
        self._client = c

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, timeout: float = 10.0) -> None:
        """Start the network thread and wait for the first CONNACK."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"mqtt-{self.client_id}")
            self._thread.start()
        start = time.monotonic()
        deadline = start + timeout
        # A broker that answers "not authorized" will not change its mind: say so now
        # rather than after the whole timeout.
        while not (self._accepted.wait(0.05) or self._denied.is_set()
                   or time.monotonic() >= deadline):
            if time.monotonic() - start >= SLOW_CONNECT:
                self.notice("connect", f"connecting to broker {self.url} as "
                            f"{self.client_id!r}: {self._refused or 'no answer yet'}; "
                            f"trying until {timeout:g}s")
        if not self._accepted.is_set():
            why = self._refused or "no answer"
            self.close()
            raise TransportError(f"cannot connect to broker {self.url} as "
                                 f"{self.client_id!r}: {why}")

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the broker has acknowledged every QoS 1 publish; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._pending_lock:
                self._prune()
                if not self._pending:
                    return True
            time.sleep(0.01)
        return False

    def close(self, flush_timeout: float = 5.0) -> None:
        """A clean disconnect (no last will), after outstanding publishes are acknowledged."""
        if self._connected.is_set():
            self.flush(flush_timeout)
        self._closing.set()
        try:
            self._client.disconnect()  # queued: the network thread writes it
        except Exception:
            pass
        own = self._thread is threading.current_thread()
        if own:  # a handler closing: this is the network thread, so write it here
            try:
                self._client.loop_write()
            except Exception:
                pass
        elif self._thread is not None and self._thread.is_alive():
            deadline = time.monotonic() + 2.0  # paho closes the socket once it is written
            while self._client.socket() is not None and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stop.set()
        if self._thread is not None and not own:
            self._thread.join(timeout=5)
        self._connected.clear()

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            if self._closing.is_set() and self._client.socket() is None:
                break  # the DISCONNECT went out (or there was no link): no reconnect
            # (Re)connect only without a socket: with one, a CONNACK may still be on its
            # way (over TLS it often takes more than one loop), and reconnecting then
            # would drop that connection and start another, forever.
            if first or self._client.socket() is None:
                try:
                    if first:
                        self._client.connect(self.url.host, self.url.port, self.keepalive)
                    else:
                        self._client.reconnect()
                    first = False
                except (OSError, ssl.SSLError, paho.WebsocketConnectionError) as e:
                    self._refused = f"{type(e).__name__}: {e}"
                    self._stop.wait(self.backoff.next_delay())
                    continue
            rc = self._client.loop(timeout=self.loop_timeout)
            if rc != paho.MQTT_ERR_SUCCESS and not (self._stop.is_set()
                                                    or self._closing.is_set()):
                self._connected.clear()
                self.reconnects += 1
                delay = self.backoff.next_delay()
                self.notice("reconnect", f"lost broker {self.url} ({paho.error_string(rc)});"
                            f" reconnecting, attempt {self.backoff.attempt}, next in "
                            f"{delay:.1f}s")
                self._stop.wait(delay)
                try:
                    self._client.reconnect()
                except (OSError, ssl.SSLError):
                    pass

    def _write_soon(self, client, userdata, sock) -> None:
        """paho queued a packet. On the network thread it goes out now, as paho would
        write it (a PUBACK, the next in-flight publish: a consumer that acknowledged a
        loop pass later fell behind a flood and the broker dropped messages); from any
        other thread paho has woken the loop, which writes it."""
        if threading.current_thread() is self._thread:
            client.loop_write()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self._refused = f"broker refused the connection: {reason_code}"
            if reason_code.value in _DENIED:
                self._denied.set()
            return
        if self.backoff.attempt:
            log.warning("connected to broker %s (attempt %d)", self.url,
                        self.backoff.attempt + 1)
        self.backoff.reset()
        self.notice.end()
        if self._patterns:
            self._subscribe_now(sorted(self._patterns))
        self._connected.set()
        self._accepted.set()
        try:
            self.on_connect()
        except Exception as e:  # a handler's bug must not kill the network thread
            self.on_error("", f"on_connect raised {type(e).__name__}: {e}")

    def _publish_raw(self, topic: str, payload: bytes, retain: bool) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        # NO_CONN and CONN_LOST leave the QoS 1 message in paho's queue; it goes out
        # again after the reconnect, so only other codes are failures.
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN,
                           paho.MQTT_ERR_CONN_LOST):
            raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        with self._pending_lock:
            self._pending.append(info)
            if len(self._pending) > self._pending_mark:
                # Each info is ~1.5 KB: kept until 1024 of them, they made a long-running
                # aggregator's RSS climb ~30 KiB a round (the soak's fit). Twice what is
                # still unacknowledged keeps the scans amortized O(1) per publish.
                self._prune()
                self._pending_mark = max(64, 2 * len(self._pending))

    def _prune(self) -> None:
        """Forget the acknowledged publishes (the caller holds ``_pending_lock``)."""
        keep = []
        for info in self._pending:
            if self._acked(info):
                self._acked_mids.discard(info.mid)
            else:
                keep.append(info)
        self._pending = keep

    def _acked(self, info: paho.MQTTMessageInfo) -> bool:
        """Whether the broker acknowledged a publish. paho raises from ``is_published``
        for messages queued while disconnected (their error code stays), though it sends
        them after reconnecting: their PUBACK is the one ``on_publish`` recorded."""
        try:
            return info.is_published()
        except (RuntimeError, ValueError):
            return info.mid in self._acked_mids

    def _subscribe_raw(self, pattern: str) -> None:
        self._subscribe_many([pattern])

    def _subscribe_many(self, patterns: list[str]) -> None:
        # One SUBSCRIBE for a filter and its chunks' twin (and for all of them after a
        # connect): each is a packet and an acknowledgement to handle, and a device
        # fetching its model each round sent four of its ~13 packets that way.
        self._patterns.update(patterns)
        if self._connected.is_set():
            self._subscribe_now(patterns)

    def _subscribe_now(self, patterns: list[str]) -> None:
        rc, mid = self._client.subscribe([(p, 1) for p in patterns])
        if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
            self._sub_sent.add(mid)

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Wait until the broker granted every subscription sent so far (its SUBACK): a
        message published after that reaches this client. False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            done = self._sub_sent & self._sub_acked
            self._sub_sent -= done
            self._sub_acked -= done
            if not self._sub_sent and self._connected.is_set():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def _unsubscribe_raw(self, pattern: str) -> None:
        self._unsubscribe_many([pattern])

    def _unsubscribe_many(self, patterns: list[str]) -> None:
        self._patterns.difference_update(patterns)
        if self._connected.is_set():
            self._client.unsubscribe(list(patterns))


def _no_delay(client, userdata, sock) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def _tls_context(ca_file: str | None, cert_file: str | None,
                 key_file: str | None) -> ssl.SSLContext:
    """TLS that checks the broker's certificate and name (against ``ca_file``, else the
    system's CAs), with our client certificate if given; unreadable files are one error."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise TransportError(f"CA file {ca_file}: cannot load: {e}") from None
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"client certificate {cert_file} / key {key_file}: "
                                 f"cannot load: {e}") from None
    return ctx
