"""Codecs by name. ``register(name, impl)`` adds one; the built-ins are registered here."""
from __future__ import annotations

from device_runtime.codecs.act import ActCodec
from device_runtime.codecs.base import Codec, CodecContext
from device_runtime.codecs.fp16 import Fp16Codec
from device_runtime.codecs.fedmrn import FedMRNCodec
from device_runtime.codecs.fp32 import Fp32Codec
from device_runtime.codecs.int8 import Int8Codec
from device_runtime.codecs.mixed import SplitCodec
from device_runtime.codecs.sign import SignCodec
from device_runtime.registry import Registry

CODECS: Registry[Codec] = Registry("codec")


def register(name: str, impl: Codec) -> Codec:
    return CODECS.register(name, impl)


def get(name: str) -> Codec:
    return CODECS.get(name)


register("fp32", Fp32Codec())
register("fp16", Fp16Codec())
register("int8", Int8Codec())
register("sign", SignCodec())
register("fedmrn", FedMRNCodec())
register("fedmrn-signed", FedMRNCodec(scale=0.02, signed=True, name="fedmrn-signed"))
register("signmix", SplitCodec("signmix", SignCodec(), Fp16Codec()))
register("act8", ActCodec(8, "act8"))
register("act4", ActCodec(4, "act4"))

__all__ = ["Codec", "CodecContext", "register", "get", "CODECS"]
