"""Device side of fedge: manifest verification, ONNX Runtime inference, wire format.

Imports only numpy, onnxruntime and paho-mqtt at module level, so that
``pip install fedge[device]`` on a Raspberry Pi or phone is enough. Torch is
imported only inside the local-training path.
"""
from __future__ import annotations

import functools

from device_runtime.errors import FedgeError

__all__ = ["FedgeError", "Predictor", "fedge_version"]


@functools.cache
def fedge_version() -> str:
    """The installed fedge distribution's version (a device reports it in its status);
    "" when fedge runs from a source tree that is not installed."""
    from importlib import metadata

    try:
        return metadata.version("fedge")
    except metadata.PackageNotFoundError:
        return ""


def __getattr__(name: str):
    # Lazy, so that a device that only relays frames never loads onnxruntime.
    if name == "Predictor":
        from device_runtime.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'device_runtime' has no attribute {name!r}")
