"""signmix: one bit per weight for conv and linear weights, float16 for the rest.

The matrices (every tensor of rank >= 2) are almost all of a model's values and
take a 1-bit code well; the vectors (biases, BatchNorm scales and shifts) are
~1% of the values but each one matters more, and a sign with one magnitude per
tensor codes them badly. So, as FedMRN does for its uplink, they travel in
higher precision, here float16 deltas. Used for the coded downlink, where the
sign error would otherwise be carried round after round in the BatchNorm
parameters.

A tensor's route is decided by its rank in ``ctx.reference`` (both ends hold
it), so a payload needs a reference to decode.
"""
from __future__ import annotations

from device_runtime.codecs.base import Codec, CodecContext, Weights
from device_runtime.errors import WireError
from device_runtime.wire import TensorSpec


class SplitCodec(Codec):
    """Matrices through ``big``, everything else through ``small``."""

    relative = True

    def __init__(self, name: str, big: Codec, small: Codec):
        self.name, self.big, self.small = name, big, small

    @staticmethod
    def _is_big(shape: tuple[int, ...]) -> bool:
        return len(shape) >= 2

    def encode(self, weights: Weights, ctx: CodecContext) -> tuple[Weights, dict[str, dict]]:
        big = {k: v for k, v in weights.items() if self._is_big(v.shape)}
        t1, p1 = self.big.encode(big, ctx)
        t2, p2 = self.small.encode({k: v for k, v in weights.items() if k not in big}, ctx)
        return {k: {**t1, **t2}[k] for k in weights}, {**p1, **p2}

    def decode(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext) -> Weights:
        if ctx.reference is None:
            raise WireError(f"codec {self.name}: expected a reference model to decode against")
        missing = [k for k in tensors if k not in ctx.reference]
        if missing:
            raise WireError(f"tensor {missing[0]!r}: expected a name of the reference model")
        big = [k for k in tensors if self._is_big(ctx.reference[k].shape)]
        small = [k for k in tensors if k not in big]
        out = {**self.big.decode({k: tensors[k] for k in big},
                                 {k: params[k] for k in big if k in params}, ctx),
               **self.small.decode({k: tensors[k] for k in small},
                                   {k: params[k] for k in small if k in params}, ctx)}
        return {k: out[k] for k in tensors}

    def wire_spec(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorSpec]:
        big = {k: s for k, s in shapes.items() if self._is_big(tuple(s))}
        return {**self.big.wire_spec(big),
                **self.small.wire_spec({k: s for k, s in shapes.items() if k not in big})}
