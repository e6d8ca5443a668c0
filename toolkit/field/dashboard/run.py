"""``fedge dashboard``: the keys, the read-only subscription and the web server.

The dashboard only subscribes (the plan, the devices' statuses, the round summary,
the newest rollout's report):
it publishes nothing, so a broker credential that may only read ``fedge/#`` is enough
(``fedge secure init`` issues one: ``credentials/dashboard.json``). It needs the
aggregator's public key (``server.pub``, the credentials' ``trust``) and the fleet's
registry of device keys (``registry.json``, the credentials' ``registry``) to check
what it shows.
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from toolkit.errors import UsageError

DASHBOARD = "dashboard"  # the username fedge secure init issues for it


@dataclass(frozen=True)
class DashboardOptions:
    broker: str
    job: str
    credentials: str | None = None
    trust: str | None = None  # the aggregator's public key (server.pub)
    registry: str | None = None  # the devices' public keys (registry.json)
    host: str = "127.0.0.1"
    port: int = 8765

    def check(self) -> None:
        from device_runtime.topics import check_id

        check_id("job", self.job)
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port: expected 0-65535, got {self.port}")


def _keys(opts: DashboardOptions):
    """(aggregator's public key, RegistryFile), from the flags or the credentials."""
    from device_runtime.credentials import key_paths
    from device_runtime.keys import PublicKey, RegistryFile

    trust, registry = key_paths(opts.credentials, {"trust": opts.trust,
                                                   "registry": opts.registry})
    if trust is None:
        raise UsageError("--trust: expected the aggregator's public key (server.pub), got "
                         "none: no round summary could be checked")
    if registry is None:
        raise UsageError("--registry: expected the fleet's device keys (registry.json), "
                         "got none: no device status could be checked")
    return PublicKey.load(trust), RegistryFile(registry)


def subscribe(opts: DashboardOptions, view):
    """A connected, read-only MQTT client feeding ``view``."""
    from device_runtime.credentials import transport_kwargs
    from device_runtime.transport.mqtt import MqttTransport

    t = MqttTransport(opts.broker, f"fedge-{opts.job}-{DASHBOARD}-{secrets.token_hex(3)}",
                      **transport_kwargs(opts.credentials))
    t.on_error = lambda topic, why: view.refuse("chunk", ValueError(why))
    t.connect()
    for topic in (view.topics.plan, view.topics.summary, view.topics.status(),
                  view.topics.rollouts):
        t.subscribe(topic, view.take)
    return t


def run_dashboard(opts: DashboardOptions) -> int:
    """Serve the dashboard until interrupted."""
    opts.check()
    server_key, registry = _keys(opts)
    try:
        import uvicorn

        from toolkit.field.dashboard.app import create_app
    except ImportError as e:
        raise UsageError(f"fedge dashboard: expected the server extra (starlette, uvicorn, "
                         f"prometheus-client), got no {e.name!r}: pip install "
                         "'fedge[server]'") from None
    from toolkit.field.dashboard.view import FleetView

    view = FleetView(opts.job, server_key, registry)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s dashboard %(message)s")
    t = subscribe(opts, view)
    print(f"dashboard for job {opts.job} on http://{opts.host}:{opts.port}/ "
          f"(metrics on /metrics; broker {opts.broker})", flush=True)
    try:
        # Open event streams never end by themselves: on SIGTERM or ^C, close them after 1 s.
        uvicorn.run(create_app(view), host=opts.host, port=opts.port, log_level="warning",
                    timeout_graceful_shutdown=1)
    finally:
        t.close()
    return 0

