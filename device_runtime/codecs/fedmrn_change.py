"""FedMRN's downlink code: a round's aggregate as entropy-coded levels of the mask fraction.

A FedMRN aggregate moves each masked weight by ``noise * f``, ``f`` the devices'
(sample-weighted) fraction of set mask bits. ``f`` is sparse and skewed (cnn-wide
on MNIST-1D, round 6: 64% of weights at exactly 0, 90% below 0.27), so one plain
bit per weight spends most of its bit on zeros: the majority (f > 0.5) left 94% of
the change's squared error, and the best two levels per tensor 23%. Here ``f`` is
quantized with a uniform step, the finest whose symbol entropy fits ``BITS`` bits
per weight; each symbol is rebuilt at the noise²-weighted mean of the ``f`` it
stands for (the levels travel in the params), and the symbols, packed 1, 2, 4 or 8
bits each, are compressed with LZMA2 (the standard library's, in C on both ends).
On that round: step 1/3, 0.86 bits per weight, 11% of the squared error.

Everything is a pure function of the inputs, so a restarted aggregator and every
device compute the same values; the device's sha256 check of the rebuilt model
frame covers the whole chain.
"""
from __future__ import annotations

import lzma

import numpy as np

from device_runtime.errors import WireError

BITS = 1.0  # per masked weight, as the uplink's mask: the downlink costs no more
STEPS = (1 / 16, 1 / 12, 1 / 10, 1 / 8, 1 / 6, 1 / 5, 1 / 4, 1 / 3, 1 / 2)  # finest first
MAX_LEVELS = 256  # symbols are bytes at most
# LZMA's output over the entropy, measured on FedMRN aggregates: about 1.0 for 2-bit
# symbols and 1.09 for 4-bit ones (their high bits cost it something).
OVERHEAD = {1: 1.0, 2: 1.0, 4: 1.1, 8: 1.1}
# A raw LZMA2 stream: the xz container's header, index and check would add ~60 bytes a
# frame, and the device's sha256 of the rebuilt model already covers the bytes. Preset
# 6's dictionary (all the decoder needs to know), with a hash-chain match finder that
# stops at 12-byte matches and no literal context: packed symbols have few long matches,
# so this is where preset 6 spends its time for nothing. On cnn-wide aggregates (rounds
# 1-3, 2-bit symbols): 0.6% smaller than preset 6, in 47 ms against 100.
FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "mf": lzma.MF_HC3, "nice_len": 12,
            "depth": 4, "lc": 0, "pb": 0}]
PROBE = 16  # the entropy of every 16th f rules out steps far too fine, cheaply
PROBE_MARGIN = 0.05  # bits: the probe's error on 90k samples is far below this


def width_for(levels: int) -> int:
    """Bits per packed symbol for ``levels`` distinct symbols."""
    return next(w for w in (1, 2, 4, 8) if levels <= 1 << w)


def code(f: np.ndarray, w: np.ndarray, bits: float = BITS) -> tuple[bytes, list[float]]:
    """(the compressed symbols, the level of each symbol) for ``f`` with weights ``w``:
    the finest step whose entropy fits ``bits`` a weight, coarser while LZMA's output
    does not (the estimate is close, not a bound); when no step fits (a dense f), two
    levels split at their midpoint, one plain bit a weight."""
    if f.size == 0:  # nothing masked: one unused level
        return pack(np.zeros(0, np.uint8), 1), [0.0]
    probe = f[::PROBE]
    for step in STEPS:
        if _bits(_symbols(probe, step)[0]) > bits + PROBE_MARGIN:
            continue
        sym, lo = _symbols(f, step)
        if _bits(sym) > bits:
            continue
        levels = _levels(f, w, sym, (lo + np.arange(int(sym.max()) + 1)) * step)
        data = pack(sym, width_for(len(levels)))
        if len(data) * 8 <= bits * f.size + 64:  # + LZMA2's chunk headers
            return data, levels
    sym = _halves(f, w)
    return pack(sym, 1), _levels(f, w, sym, np.array([f.min(), f.max()]))


def _halves(f: np.ndarray, w: np.ndarray, steps: int = 4) -> np.ndarray:
    """Two symbols: f above the midpoint of the two groups' weighted means (Lloyd)."""
    t = float((w * f).sum() / max(float(w.sum()), 1e-30))
    for _ in range(steps):
        hi = f > t
        if hi.all() or not hi.any():
            break
        t = (float((w[hi] * f[hi]).sum() / w[hi].sum()) +
             float((w[~hi] * f[~hi]).sum() / w[~hi].sum())) / 2
    return (f > t).astype(np.int64)


def _symbols(f: np.ndarray, step: float) -> tuple[np.ndarray, int]:
    s = np.rint(f / np.float32(step)).astype(np.int64)
    lo = int(s.min()) if s.size else 0
    return np.minimum(s - lo, MAX_LEVELS - 1), lo  # a rare outlier shares the top level


def _bits(sym: np.ndarray) -> float:
    """Estimated compressed bits per symbol: the entropy, times LZMA's overhead."""
    n = int(sym.max()) + 1 if sym.size else 1
    p = np.bincount(sym, minlength=n) / max(sym.size, 1)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) * OVERHEAD[width_for(n)]


def _levels(f: np.ndarray, w: np.ndarray, sym: np.ndarray, centre: np.ndarray
            ) -> list[float]:
    """Each symbol's level: the ``w``-weighted mean of its ``f`` (``centre`` if unused)."""
    n = len(centre)
    weight = np.bincount(sym, weights=w, minlength=n)
    mean = np.bincount(sym, weights=w * f, minlength=n) / np.maximum(weight, 1e-30)
    # The shortest decimal that is the same float32: a short header, exact levels.
    return [float(str(np.float32(m if wt > 0 else c))) for m, wt, c in zip(mean, weight, centre)]


def pack(sym: np.ndarray, width: int) -> bytes:
    """Symbols of ``width`` bits, little-endian within each byte, compressed."""
    sym = sym.astype(np.uint8)
    per = 8 // width
    padded = np.zeros(-(-sym.size // per) * per, np.uint8)
    padded[:sym.size] = sym
    rows = padded.reshape(-1, per)
    out = np.zeros(len(rows), np.uint8)
    for i in range(per):
        out |= rows[:, i] << np.uint8(i * width)
    return lzma.compress(out.tobytes(), format=lzma.FORMAT_RAW, filters=FILTERS)


def unpack(data: bytes, count: int, levels: int) -> np.ndarray:
    """The ``count`` symbols in ``data`` (WireError unless it is exactly what ``pack``
    makes of ``count`` symbols below ``levels``; never expands past that size)."""
    width = width_for(levels)
    per = 8 // width
    size = -(-count // per)
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=FILTERS)
    try:
        raw = dec.decompress(data, max_length=size + 1)
    except lzma.LZMAError as e:
        raise WireError(f"tensor 'codes': not an LZMA2 stream ({e})") from None
    if len(raw) != size or not dec.eof or dec.unused_data:
        raise WireError(f"tensor 'codes': expected {size} bytes of symbols in one LZMA2 stream, "
                        f"got {len(raw)}{'' if dec.eof else ' and more'}")
    packed = np.frombuffer(raw, np.uint8)
    sym = np.empty((size, per), np.uint8)
    for i in range(per):
        sym[:, i] = (packed >> np.uint8(i * width)) & np.uint8((1 << width) - 1)
    sym = sym.reshape(-1)
    if sym[count:].any():
        raise WireError(f"tensor 'codes': expected zero padding after symbol {count - 1}")
    sym = sym[:count]
    if sym.size and int(sym.max()) >= levels:
        raise WireError(f"tensor 'codes': symbol {int(sym.max())} has no level "
                        f"(params.levels has {levels})")
    return sym


def check_levels(levels) -> list[float]:
    """``levels`` if it is a list of 1..MAX_LEVELS finite numbers, else WireError."""
    if not (isinstance(levels, list) and 1 <= len(levels) <= MAX_LEVELS and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)
            for x in levels)):
        raise WireError(f"tensor codes params.levels: expected 1 to {MAX_LEVELS} finite "
                        f"numbers, got {str(levels)[:60]}")
    return levels


__all__ = ["BITS", "code", "pack", "unpack", "check_levels", "width_for"]
