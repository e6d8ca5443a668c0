"""The device's config file: what `fedge device --config FILE` runs, as a bundle installs it.

A TOML file whose keys are ``fedge device``'s options (``broker``, ``job``, ``id``,
``profile``, ``data``, ``credentials``, ``manifest``, ``trust``,
``allow_custom_model`` (a list of ``module:callable[={json}]``), ...). Relative paths
are relative to the file's folder, so a bundle can be unpacked anywhere. An option
given on the command line wins over the file. Errors name the file and the key.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from device_runtime.errors import EXIT_USAGE, DeviceRuntimeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - JetPack 6 ships Python 3.10
    import tomli as tomllib


class ConfigError(DeviceRuntimeError):
    """The device config file is missing, not TOML, or has a bad key or value."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class DeviceConfig:
    broker: str | None = None
    job: str | None = None
    id: str | None = None
    profile: str | None = None
    data: str | None = None
    credentials: str | None = None  # DIR/credentials/<id>.json from `fedge secure init`
    manifest: str | None = None  # the export's manifest.json (signed)
    trust: str | None = None  # the aggregator's public key (it also signs the export)
    key: str | None = None  # this device's own signing key (fedge secure init issues it)
    profiles_file: str | None = None
    threads: int | None = None
    max_payload: int | None = None
    idle_timeout: float | None = None
    # The custom model factories this device may build (device_runtime.local_models).
    allow_custom_model: tuple[str, ...] | None = None


PATHS = ("data", "credentials", "manifest", "trust", "key", "profiles_file")
REQUIRED = ("broker", "job", "id", "profile", "data")
_TYPES = {f.name: f.type for f in dataclasses.fields(DeviceConfig)}


def load_config(path: str | Path) -> DeviceConfig:
    """The config in ``path`` with its relative paths made absolute."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path} is not readable: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not TOML: {e}") from None
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _TYPES:
            raise ConfigError(f"config {path}: unknown key {key!r}; valid keys: "
                              f"{', '.join(_TYPES)}")
        values[name] = _check(path, key, _TYPES[name], value)
        if name in PATHS:
            values[name] = str((path.parent / value).resolve())
    return DeviceConfig(**values)


def _check(path: Path, key: str, typ: str, value: object) -> object:
    """``value`` if it has the type the field's annotation names ("str | None", ...)."""
    if typ.startswith("tuple[str"):
        if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            return tuple(value)
        raise ConfigError(f"config {path}: {key}: expected a list of non-empty strings, "
                          f"got {value!r}")
    if "int" in typ and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "float" in typ and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if "str" in typ and isinstance(value, str) and value:
        return value
    want = typ.replace(" | None", "")
    raise ConfigError(f"config {path}: {key}: expected {'a non-empty ' if want == 'str' else ''}"
                      f"{want}, got {value!r}")


def merge(cli: dict, config: DeviceConfig | None) -> dict:
    """The options to run with: the command line's where given, else the config's.
    A required option missing from both is a one-line error naming both places."""
    out = dict(cli)
    if config is not None:
        for name, value in dataclasses.asdict(config).items():
            if out.get(name) is None and value is not None:
                out[name] = value
    missing = [n for n in REQUIRED if out.get(n) is None]
    if missing:
        flags = ", ".join(f"--{n.replace('_', '-')}" for n in missing)
        raise ConfigError(f"missing {flags} (give it on the command line or in --config)")
    return out
