"""The checks every update passes before it is folded in: one copy, used by the
aggregator and by its scale-out workers (``broker_server/workers.py``), so both
accept and refuse exactly the same payloads."""
from __future__ import annotations

from device_runtime import wire
from device_runtime.codecs import Codec
from device_runtime.errors import WireError


def update_expect(job: str, round_: int, device: str, codec: Codec, strategy, variant: str,
                  shapes: dict, samples: int) -> wire.Expect:
    """What ``device``'s update frame for ``variant`` (model tensors ``shapes``) must be."""
    return wire.Expect(kind="update", job=job, round=round_, devices=frozenset([device]),
                       codec=codec.name,
                       tensors=codec.wire_spec(strategy.update_shapes(variant, shapes, samples)))


def update_meta(frame: wire.Frame, want_variant: str | None) -> tuple[int, str]:
    """(samples, variant) from a decoded update's meta; ``want_variant`` None takes the
    variant it names (an update reloaded from disk was checked when it was accepted)."""
    samples = frame.meta.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples <= 0:
        raise WireError(f"meta.samples: expected a positive int, got {samples!r}")
    variant = frame.meta.get("variant", "full")
    want = variant if want_variant is None else want_variant
    if variant != want:
        raise WireError(f"meta.variant: expected {want!r}, got {variant!r}")
    return samples, variant
