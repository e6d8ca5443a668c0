"""The aggregator's keys, as the CLI finds them, and key files for a fleet made on the fly.

``server_trust`` builds what ``fedge serve`` (and its workers) sign and check with:
the signing key (``--signing-key``, else the credentials' ``signing_key``, else the
operator key ``$FEDGE_HOME/signing.key``, which also signs exports) and the fleet's
registry of device public keys (``--registry``, else the credentials' ``registry``).
``write_fleet_keys`` writes the same files ``fedge secure init`` issues for a fleet
that runs on one machine (``fedge demo``, tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from device_runtime.keys import Registry, RegistryFile, Signer
from toolkit.deploy.signing import default_key_path
from toolkit.errors import UsageError


@dataclass(frozen=True)
class FleetKeyFiles:
    """Where ``write_fleet_keys`` put each key."""

    dir: Path
    server_key: Path
    server_pub: Path
    registry: Path

    def device_key(self, device: str) -> Path:
        return self.dir / f"{device}.key"


def write_fleet_keys(out: str | Path, devices: list[str]) -> FleetKeyFiles:
    """A new aggregator key, one key per device and the registry, under ``out`` (0600
    private keys; refuses to overwrite one)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = FleetKeyFiles(out, out / "server.key", out / "server.pub", out / "registry.json")
    server = Signer.generate()
    server.save(files.server_key)
    files.server_pub.write_bytes(server.public.pem())
    registry = Registry()
    for device in devices:
        signer = Signer.generate()
        signer.save(files.device_key(device))
        registry = registry.with_device(device, signer.public)
    files.registry.write_bytes(registry.dumps())
    return files


def server_trust(job: str, state_dir: Path, signing_key: str | None, registry: str | None,
                 credentials: str | None):
    """The ServerTrust of ``fedge serve`` (UsageError naming what is missing)."""
    from broker_server.trust import ServerTrust
    from device_runtime.credentials import key_paths

    signing_key, registry = key_paths(credentials, {"signing_key": signing_key,
                                                    "registry": registry})
    if signing_key is None:
        signing_key = str(default_key_path())
        if not Path(signing_key).exists():
            raise UsageError(f"--signing-key: expected the key devices trust, got none (no "
                             f"--signing-key, no signing_key in the credentials, no "
                             f"{signing_key}); fedge secure init issues one, fedge "
                             "export makes this one")
    if registry is None:
        raise UsageError("--registry: expected the fleet's device keys (registry.json from "
                         "fedge secure init), got none: no device could be authenticated")
    return ServerTrust(job, Signer.load(signing_key), RegistryFile(registry), state_dir)
