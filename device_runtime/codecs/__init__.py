"""Codecs by name. ``register(name, impl)`` adds one; the built-ins are registered here."""
from __future__ import annotations

from device_runtime.codecs.base import Codec, CodecContext
from device_runtime.codecs.fp32 import Fp32Codec
from device_runtime.registry import Registry

CODECS: Registry[Codec] = Registry("codec")


def register(name: str, impl: Codec) -> Codec:
    return CODECS.register(name, impl)


def get(name: str) -> Codec:
    return CODECS.get(name)


register("fp32", Fp32Codec())

__all__ = ["Codec", "CodecContext", "register", "get", "CODECS"]
