"""Device profiles: what a device can afford (memory, compute, link, runtime).

The built-in catalogue covers common field hardware; users add or override
profiles in a TOML file::

    [profiles.my-board]
    ram_mb = 2048
    gflops = 8.0
    uplink_kbps = 1000
    downlink_kbps = 5000
    int8_dot = false
    ort_version = "1.20"
    max_opset = 21

Compute figures are sustained fp32 GFLOP/s estimates for the execution
provider fedge uses on that device (CPU, or the GPU on Jetsons); link figures
are assumptions for a field deployment, not properties of the board.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of device. Units are in the field names."""

    name: str
    ram_mb: int
    gflops: float  # sustained fp32 GFLOP/s of the execution provider fedge uses
    uplink_kbps: int
    downlink_kbps: int
    int8_dot: bool  # CPU has int8 dot-product instructions (Arm SDOT/UDOT, x86 VNNI)
    ort_version: str  # newest onnxruntime the platform can install
    max_opset: int  # highest ONNX opset that onnxruntime loads
    python: str = "3.11"
    mobile: bool = False  # ships the ORT-format (.ort) model for mobile runtimes
    accelerator: str = "cpu"  # "cpu" | "cuda"
    rtt_ms: float = 60.0  # round trip to the broker: paid per exchange by split learning
    source: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# Sources, per figure:
# - RAM: vendor product briefs (raspberrypi.com, developer.nvidia.com); the
#   variant picked is the common one for the board.
# - gflops: CPU boards from HPL (Linpack) runs on all cores as reported by
#   Jeff Geerling's top500 Pi benchmarks and Roy Longbottom's Raspberry Pi
#   benchmark pages (Pi 3B ~3.6, Pi 4 ~13.5, Pi 5 ~31 GFLOP/s); Jetsons from
#   NVIDIA's fp32 peak (Nano 236, Orin Nano 8GB 1280 GFLOP/s) derated to ~50%
#   sustained, since their agent runs on the CUDA/TensorRT provider; android-mid
#   from a 4x Cortex-A78 NEON estimate (4 cores x 2.4 GHz x 8 FLOP/cycle x ~0.3).
# - int8_dot: Arm ISA of the core: A53/A57/A72 are Armv8.0 (no dot product),
#   A76/A78/A78AE are Armv8.2 with DOTPROD.
# - ort_version / max_opset: onnxruntime's compatibility table (1.10 -> opset
#   15, 1.20 -> 21); Raspberry Pi OS Bookworm 64-bit has Python 3.11 and
#   PyPI aarch64 wheels; Jetson Nano is stuck on JetPack 4.6 (Python 3.6, the
#   Jetson Zoo onnxruntime-gpu 1.10 wheel); JetPack 6 has Python 3.10 and
#   onnxruntime-gpu 1.20; Android uses onnxruntime-android (ORT format).
# - uplink/downlink: assumed field links, not board properties: LTE Cat-1
#   modem (~2 Mbit/s up) on the Pis and Nano, 2.4 GHz Wi-Fi at range
#   (~10 Mbit/s up) on the Orin, a mid 4G phone (~5 Mbit/s up).
# - rtt_ms: typical round trips on those links: LTE Cat-1 ~60 ms, 4G ~40 ms,
#   Wi-Fi to a nearby broker ~10 ms.
BUILTIN_PROFILES: tuple[DeviceProfile, ...] = (
    DeviceProfile("rpi3b", ram_mb=1024, gflops=3.6, uplink_kbps=2000, downlink_kbps=10000,
                  int8_dot=False, ort_version="1.20", max_opset=21, python="3.11",
                  source="Cortex-A53 4x1.2GHz, 1 GB; HPL ~3.6 GFLOP/s"),
    DeviceProfile("rpi4", ram_mb=4096, gflops=13.5, uplink_kbps=2000, downlink_kbps=10000,
                  int8_dot=False, ort_version="1.20", max_opset=21, python="3.11",
                  source="Cortex-A72 4x1.5GHz, 4 GB variant; HPL ~13.5 GFLOP/s"),
    DeviceProfile("rpi5", ram_mb=8192, gflops=31.0, uplink_kbps=2000, downlink_kbps=10000,
                  int8_dot=True, ort_version="1.20", max_opset=21, python="3.11",
                  source="Cortex-A76 4x2.4GHz, 8 GB variant; HPL ~31 GFLOP/s"),
    DeviceProfile("jetson-nano", ram_mb=4096, gflops=118.0, uplink_kbps=2000,
                  downlink_kbps=10000, int8_dot=False, ort_version="1.10", max_opset=15,
                  python="3.6", accelerator="cuda",
                  source="Maxwell 128 cores, 236 GFLOP/s fp32 peak; JetPack 4.6, ORT 1.10"),
    DeviceProfile("jetson-orin-nano", ram_mb=8192, gflops=640.0, uplink_kbps=10000,
                  downlink_kbps=50000, int8_dot=True, ort_version="1.20", max_opset=21,
                  python="3.10", accelerator="cuda", rtt_ms=10.0,
                  source="Ampere 1024 cores, 1.28 TFLOP/s fp32 peak; JetPack 6, ORT 1.20"),
    DeviceProfile("android-mid", ram_mb=6144, gflops=23.0, uplink_kbps=5000,
                  downlink_kbps=20000, int8_dot=True, ort_version="1.20", max_opset=21,
                  python="n/a", mobile=True, rtt_ms=40.0,
                  source="4x Cortex-A78 2.4GHz NEON estimate; onnxruntime-android"),
)

_FIELDS = {f.name: f for f in dataclasses.fields(DeviceProfile)}
_REQUIRED = [n for n, f in _FIELDS.items()
             if f.default is dataclasses.MISSING and n != "name"]
_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


@dataclass
class ProfileCatalogue:
    """Profiles by name: the built-ins, overridden or extended by user files."""

    profiles: dict[str, DeviceProfile] = field(default_factory=dict)

    @classmethod
    def load(cls, profiles_file: str | Path | None = None) -> "ProfileCatalogue":
        cat = cls({p.name: p for p in BUILTIN_PROFILES})
        if profiles_file is not None:
            cat.profiles.update(load_profiles_toml(profiles_file))
        return cat

    def names(self) -> list[str]:
        return list(self.profiles)

    def get(self, name: str) -> DeviceProfile:
        if name not in self.profiles:
            raise ProfileError(
                f"unknown device profile {name!r}; known: {', '.join(self.profiles)}")
        return self.profiles[name]

    def select(self, spec: str) -> list[DeviceProfile]:
        """Profiles named by a comma list, or ``all``."""
        if spec.strip() == "all":
            return list(self.profiles.values())
        names = [n.strip() for n in spec.split(",") if n.strip()]
        if not names:
            raise ProfileError("no device profile named (give a comma list or 'all')")
        return [self.get(n) for n in dict.fromkeys(names)]


def load_profiles_toml(path: str | Path) -> dict[str, DeviceProfile]:
    """Parse a user profiles file; every problem names the file and the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"profiles file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"profiles file {path} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"profiles file {path} is not valid TOML: {e}") from None
    table = data.get("profiles")
    if not isinstance(table, dict) or not table:
        raise ProfileError(f"profiles file {path}: expected a [profiles.<name>] table")
    return {name: _profile_from_table(path, name, body) for name, body in table.items()}


def _profile_from_table(path: Path, name: str, body: object) -> DeviceProfile:
    where = f"profiles file {path}: profiles.{name}"
    if not isinstance(body, dict):
        raise ProfileError(f"{where}: expected a table, got {type(body).__name__}")
    unknown = sorted(set(body) - set(_FIELDS) - {"name"})
    if unknown:
        raise ProfileError(f"{where}: unknown field {unknown[0]!r}; "
                           f"valid: {', '.join(n for n in _FIELDS if n != 'name')}")
    missing = [n for n in _REQUIRED if n not in body]
    if missing:
        raise ProfileError(f"{where}: missing field {missing[0]!r}")
    values = {}
    for key, value in body.items():
        if key == "name":
            continue
        want = _FIELDS[key].type
        ok = isinstance(value, _TYPES[want]) and not (want != "bool" and isinstance(value, bool))
        if not ok:
            raise ProfileError(f"{where}.{key}: expected {want}, got "
                               f"{type(value).__name__} {value!r}")
        # TOML has nan and inf: nan passes every comparison and inf shrinks every
        # other device to the floor, so a profile figure must be finite.
        if want in ("int", "float") and not (math.isfinite(value) and value > 0):
            raise ProfileError(f"{where}.{key}: expected a positive finite number, "
                               f"got {value!r}")
        values[key] = float(value) if want == "float" else value
    return DeviceProfile(name=name, **values)
