"""What the aggregator and its scale-out workers (``broker_server/workers.py``) share at
the boundary: the checks every update passes before it is folded in (so both accept
and refuse exactly the same payloads), and the loop step that handles queued
messages without letting a bad one stop the service; and the aggregator's reload of
the updates it accepted before a restart."""
from __future__ import annotations

import logging
import queue
from typing import Callable

from device_runtime import wire
from device_runtime.codecs import Codec
from device_runtime.errors import FedgeError, WireError

log = logging.getLogger("fedge.server")


def update_expect(job: str, round_: int, device: str, codec: Codec, strategy, variant: str,
                  shapes: dict, samples: int, nonce: str | None = None) -> wire.Expect:
    """What ``device``'s update frame for ``variant`` (model tensors ``shapes``) must be;
    ``nonce``: the nonce of the task it answers."""
    return wire.Expect(kind="update", job=job, round=round_, devices=frozenset([device]),
                       codec=codec.name,
                       tensors=codec.wire_spec(strategy.update_shapes(variant, shapes, samples)),
                       nonce=nonce)


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


def pump(events: queue.Queue, timeout: float, parse: Callable[[str], dict],
         handle: Callable[[str, dict, bytes], None],
         reject: Callable[[dict, str], None]) -> None:
    """Handle every queued (topic, payload), waiting up to ``timeout`` for the first. A
    FedgeError is a rejected message; any other exception is a bug, logged with its
    traceback, and the message is rejected too: neither stops the loop."""
    try:
        item = events.get(timeout=timeout)
    except queue.Empty:
        return
    while item is not None:
        topic, payload = item
        where = parse(topic)
        try:
            handle(topic, where, payload)
        except FedgeError as e:
            reject(where, str(e))
        except Exception as e:  # a bug here must not stop the service
            log.exception("unexpected error handling %s", topic)
            reject(where, f"internal error: {type(e).__name__}: {e}")
        try:
            item = events.get_nowait()
        except queue.Empty:
            item = None


def reload_accepted(agg, rs) -> None:
    """For ``agg`` (an ``Aggregator``) opening round ``rs``: updates accepted before a
    crash count again; none is lost (each still signed by its device). Updates sent
    while no round was open were refused: the device answers the task again when it
    is re-sent with the same nonce. A saved update that is damaged, not this round's or
    not signed by its device is named and rejected; its device is asked again like any
    other that has not reported."""
    saved, damaged = agg.store.accepted_updates(rs.number)
    for device, why in damaged:
        agg._reject({"round": rs.number, "device": device, "kind": "update"}, why)
    for device, (_, payload) in saved.items():
        try:
            frame = agg.trust.update(payload, wire.Expect(
                kind="update", job=agg.opts.job, round=rs.number), device)
            agg._fold_in(rs, frame, payload, enforce=False)  # checked when accepted
        except FedgeError as e:
            agg._reject({"round": rs.number, "device": device, "kind": "update"},
                         f"saved update of round {rs.number}: {e}")
            continue
        rs.uplink_bytes += len(payload)
