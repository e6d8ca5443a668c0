"""The floor every strategy gets: a device's weight and its update's size are bounded.

A device with valid credentials can still lie in its update. Two checks stand
between it and the global model, before any strategy sees the update:

- **Weight.** An update counts with ``min(meta.samples, registered, max_samples)``
  samples: ``registered`` is what the device's status said when the aggregator
  first saw it online in this job (kept in the state dir, never raised by a later
  status), ``max_samples`` a job-wide cap (``fedge serve --max-samples``).
- **Magnitude.** The update's *change* against the model the device trained from
  is measured as an RMS (the L2 norm over sqrt(values), so that HeteroFL's or
  SplitMix's smaller variants compare with the full model's) and refused when it
  is not finite or above ``factor`` x the median of the reference norms: the
  changes accepted so far this round together with those of the previous round
  (zero changes, from a device that trained nothing, do not count). With fewer
  than ``MIN_REFERENCE`` of them (the first updates of the first round) the bound
  is ``COLD_FACTOR`` x the RMS of the weights the device trained from (at least
  ``COLD_FLOOR``): honest round-1 changes from random weights measured up to 6.8x
  that RMS (lr 0.1 x 5 epochs; 0.54x at the defaults, docs/results/guard.md), so
  the cold bound stops a blown-up model but not one of the weights' own scale
  (zeros, other weights): that one counts with its capped weight, one device's
  share. Holding the first updates until a median exists would close that window
  at the cost of the round's latency; it is not done.

The change is what a codec's update means against the variant's weights:
``register_change(codec, fn)`` names how to get it; the default decodes the update
and subtracts the reference. FedMRN's masked weights change by at most the round's
noise, which the device does not choose, so only its full-precision part is
measured. Updates that are not the variant's weights (EcoFed's activations, REFT's
logits) have no change to measure: only the wire's finiteness check applies.
Everything here is pure numpy, tested directly (tests/test_guard.py).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from device_runtime.codecs import Codec, CodecContext
from device_runtime.codecs.base import Weights
from device_runtime.errors import WireError

NORM_BOUND = 8.0  # factor x median; honest max/median measured in docs/results/guard.md
MIN_REFERENCE = 3  # norms a median needs before it bounds anything
COLD_FACTOR = 20.0  # x RMS of the reference weights, while no median exists (measured: 6.8)
COLD_FLOOR = 0.1  # RMS change: the cold bound for a (near) zero reference
MAX_SAMPLES = 1_000_000  # the default job-wide cap on an update's sample count


class GuardError(WireError):
    """An update refused by the guard (a WireError: the aggregator's reject path)."""


def sample_weight(claimed: int, registered: int | None, max_samples: int) -> int:
    """The samples an update counts with: its claim, capped by the device's registered
    count (None: not registered, no cap from it) and the job's maximum."""
    return min(claimed, max_samples, claimed if registered is None else registered)


def rms(tensors: Weights) -> float:
    """sqrt(mean of squares) over every value of every tensor, in float64 (0.0 if empty)."""
    total, count = 0.0, 0
    for t in tensors.values():
        flat = np.asarray(t).reshape(-1)
        # einsum, not dot: squares summed in float64 without a float64 copy, and no BLAS
        # threads (np.dot was 10x slower on a loaded 2-core machine)
        total += float(np.einsum("i,i->", flat, flat, dtype=np.float64))
        count += flat.size
    return math.sqrt(total / count) if count else 0.0


def difference(weights: Weights, reference: Weights) -> Weights | None:
    """``weights - reference`` in float64, or None when ``weights`` are not the
    reference's tensors (a name it lacks or another shape). Every tensor of the
    reference, in its order (a whole model): one flat vector ``{"change": ...}`` (the
    RMS is over every value either way); a subset: per tensor."""
    if not weights or any(k not in reference or np.shape(reference[k]) != np.shape(v)
                          for k, v in weights.items()):
        return None
    if len(weights) == len(reference) and all(a == b for a, b in zip(weights, reference)):
        # One subtraction, not one per tensor: per-tensor numpy calls were most of the
        # guard's time (24 tensors: 0.18 -> 0.11 ms an update).
        flat = np.concatenate([np.asarray(v).reshape(-1) for v in weights.values()])
        return {"change": np.subtract(flat, _flat(reference), dtype=np.float64)}
    return {k: np.subtract(v, reference[k], dtype=np.float64) for k, v in weights.items()}


_FLAT: dict[int, tuple[list, np.ndarray]] = {}  # id(reference) -> (its arrays, flat)
FLAT_KEPT, FLAT_BYTES = 4, 256 << 20  # references kept flat: a round's variants, bounded


def _flat(reference: Weights) -> np.ndarray:
    """The reference's values as one vector (in their own dtype: the subtraction casts
    to float64 as it did per tensor), made once per round's reference: the cached one is
    used only while the reference holds the very same arrays (the round's weights are
    never changed in place). The newest few are kept, within FLAT_BYTES."""
    arrays = list(reference.values())
    hit = _FLAT.get(id(reference))
    if hit is not None and len(hit[0]) == len(arrays) and \
            all(a is b for a, b in zip(hit[0], arrays)):
        return hit[1]
    flat = np.concatenate([np.asarray(a).reshape(-1) for a in arrays])
    _FLAT[id(reference)] = (arrays, flat)
    while len(_FLAT) > FLAT_KEPT or (len(_FLAT) > 1 and sum(
            sum(a.nbytes for a in arrs) + f.nbytes for arrs, f in _FLAT.values()) > FLAT_BYTES):
        _FLAT.pop(next(iter(_FLAT)))
    return flat


def change_rms(weights: Weights, reference: Weights) -> float | None:
    """RMS of ``weights - reference`` (None: not the reference's tensors)."""
    diff = difference(weights, reference)
    return None if diff is None else rms(diff)


def norm_bound(references: list[float], factor: float, reference_rms: float
               ) -> tuple[float, str]:
    """(bound, what it is) for the next update's change RMS (``factor`` inf: none):
    ``factor`` x the median of ``references`` once there are ``MIN_REFERENCE`` of them,
    before that ``COLD_FACTOR`` x the reference weights' RMS (at least ``COLD_FLOOR``)."""
    if math.isinf(factor):
        return math.inf, "no bound"
    if len(references) >= MIN_REFERENCE:
        med = statistics.median(references)
        return factor * med, f"{factor:g} x the median change {med:.4g}"
    cold = max(COLD_FACTOR * reference_rms, COLD_FLOOR)
    return cold, f"{COLD_FACTOR:g} x the RMS of the weights it was trained from, no median yet"


def refusal(norm: float, bound: float, why: str) -> str | None:
    """The reason to refuse a change of RMS ``norm``, or None to accept it."""
    if not math.isfinite(norm):
        return f"change: expected a finite norm, got {norm}"
    if norm > bound:
        return f"change: RMS {norm:.4g} exceeds the bound {bound:.4g} ({why})"
    return None


# --- what an update changes, per codec ---------------------------------------------
ChangeFn = Callable[[Codec, Weights, dict, CodecContext], "Weights | None"]
_CHANGES: dict[str, ChangeFn] = {}


def register_change(codec_name: str, fn: ChangeFn) -> ChangeFn:
    """``fn(codec, tensors, params, ctx)``: the update's change against ``ctx.reference``
    (as tensors), or None if it has none to measure."""
    _CHANGES[codec_name] = fn
    return fn


def decoded_change(codec: Codec, tensors: Weights, params: dict, ctx: CodecContext
                   ) -> Weights | None:
    """The default: decode against the reference, subtract it."""
    ref = ctx.reference
    if ref is None or any(k not in ref for k in tensors):  # not model weights
        return None
    return difference(codec.decode(tensors, params, ctx), ref)


def fedmrn_change(codec: Codec, tensors: Weights, params: dict, ctx: CodecContext
                  ) -> Weights | None:
    """FedMRN: the full-precision values against the reference's (the masks are bounded
    by the round's noise)."""
    from device_runtime.codecs.fedmrn import layout

    ref = ctx.reference
    if ref is None:
        return None
    _, dense, stats = layout({k: v.shape for k, v in ref.items()})
    out = {}
    for name, names in (("dense", dense), ("stats", stats)):
        flat = np.concatenate([np.asarray(ref[k], np.float64).reshape(-1) for k in names]) \
            if names else np.zeros(0)
        got = np.asarray(tensors[name], np.float64).reshape(-1)
        if got.shape != flat.shape:
            raise WireError(f"fedmrn: tensor {name!r}: expected {flat.size} values, "
                            f"got {got.size}")
        out[name] = got - flat
    return out


def change_of(codec: Codec, tensors: Weights, params: dict, ctx: CodecContext
              ) -> Weights | None:
    return _CHANGES.get(codec.name, decoded_change)(codec, tensors, params, ctx)


register_change("fedmrn", fedmrn_change)
register_change("fedmrn-signed", fedmrn_change)


# --- the aggregator's state for it ----------------------------------------------------
@dataclass
class UpdateGuard:
    """The guard of one job: registered sample counts (persisted beside the state),
    the previous round's accepted change norms (in state.json) and this round's."""

    factor: float = NORM_BOUND
    max_samples: int = MAX_SAMPLES
    registered: dict[str, int] = field(default_factory=dict)
    previous: list[float] = field(default_factory=list)
    current: dict[str, float] = field(default_factory=dict)
    _rms: dict[int, float] = field(default_factory=dict, repr=False)

    def register(self, devices: Iterable[tuple[str, int]]) -> bool:
        """Record the samples of devices seen for the first time; True if any was new."""
        new = {d: int(n) for d, n in devices if d not in self.registered}
        self.registered.update(new)
        return bool(new)

    def weight(self, device: str, claimed: int) -> int:
        return sample_weight(claimed, self.registered.get(device), self.max_samples)

    def measure(self, device: str, codec: Codec, tensors: Weights, params: dict,
                ctx: CodecContext, enforce: bool = True) -> float | None:
        """The update's change RMS (None: nothing to measure); GuardError if ``enforce``
        and it is out of bounds. Changes nothing: ``accept`` records it."""
        change = change_of(codec, tensors, params, ctx)
        if change is None:
            return None
        norm = rms(change)
        if enforce:
            bound, why = norm_bound(self.references(), self.factor,
                                    self._reference_rms(ctx.reference or {}))
            reason = refusal(norm, bound, why)
            if reason:
                raise GuardError(reason)
        return norm

    def screen(self, rs, codec: Codec, seed: int, frame, variant: str, enforce: bool = True
               ) -> float | None:
        """``measure`` a decoded update ``frame`` for ``variant`` of the open round ``rs``
        (a ``records.RoundState``) against the weights that variant was sent; a device
        refused is marked in ``rs.refused``, so that the round does not wait for it."""
        ctx = CodecContext(rs.number, seed, rs.references.get(variant), frame.device)
        try:
            return self.measure(frame.device, codec, frame.tensors, frame.params, ctx, enforce)
        except GuardError:
            rs.refused.add(frame.device)
            raise

    def _reference_rms(self, reference: Weights) -> float:
        """rms(reference), once per round and variant (the round's weights do not change)."""
        key = id(reference)
        if key not in self._rms:
            self._rms[key] = rms(reference)
        return self._rms[key]

    def references(self) -> list[float]:
        return self.previous + list(self.current.values())

    def accept(self, device: str, norm: float | None, rs=None) -> None:
        """Record a folded update's norm (in the round ``rs`` too, for its record)."""
        if rs is not None:
            rs.refused.discard(device)  # an update it sent again made it
            if norm is not None:
                rs.norms[device] = norm
        # A zero change (nothing trained) says nothing about the honest scale: a median
        # of them would refuse the first device that trained.
        if norm:
            self.current[device] = norm

    def close(self) -> list[float]:
        """End of round: this round's norms become the previous ones (if there were any:
        a round of unmeasurable updates keeps the older reference)."""
        if self.current:
            self.previous = sorted(self.current.values())
        self.current, self._rms = {}, {}
        return self.previous


__all__ = ["GuardError", "UpdateGuard", "sample_weight", "rms", "change_rms", "norm_bound",
           "refusal", "register_change", "change_of", "NORM_BOUND", "MAX_SAMPLES"]
