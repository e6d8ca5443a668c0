"""FedMRN's seeded noise is drawn once and used again (read-only), and the downlink's
LZMA2 settings changed only how the server searches, not the stream a device reads."""
from __future__ import annotations

import lzma
import threading

import numpy as np
import pytest

from device_runtime.codecs import fedmrn, fedmrn_change


def test_noise_is_the_seeded_draw_kept_read_only_and_shared():
    shape = (64, 32)
    a = fedmrn.noise("w", shape, 7)
    assert np.array_equal(a, fedmrn._draw("w", shape, 7, fedmrn.NOISE_SCALE))
    assert fedmrn.noise("w", shape, 7) is a  # drawn once
    assert not np.array_equal(fedmrn.noise("w", shape, 8), a)
    assert not np.array_equal(fedmrn.noise("v", shape, 7), a)
    with pytest.raises(ValueError, match="read-only"):
        a[0, 0] = 1.0  # one user cannot change another's noise


def test_the_cache_keeps_the_recent_ones_within_its_limit_and_threads_wait_for_a_draw():
    cache = fedmrn._NoiseCache(limit=3 * 4 * 1000)
    keys = [(f"t{i}", (1000,), 1, 0.05) for i in range(4)]
    first = [cache.get(k) for k in keys]
    assert list(cache.items) == keys[1:]  # the oldest went
    assert cache.get(keys[3]) is first[3] and cache.get(keys[0]) is not first[0]
    assert sum(v.nbytes for v in cache.items.values()) <= cache.limit
    big = cache.get(("big", (4000,), 1, 0.05))  # larger than the limit: drawn, not kept
    assert big.shape == (4000,) and ("big", (4000,), 1, 0.05) not in cache.items

    # Only the two most recent seeds are kept, whatever room is left: the soak found an
    # aggregator's memory growing round after round while the cache filled its bytes.
    by_seed = fedmrn._NoiseCache(limit=1 << 30)
    for seed in (1, 2, 3, 2, 4):
        by_seed.get(("w", (10,), seed, 0.05))
        by_seed.get(("v", (10,), seed, 0.05))
    assert sorted({k[2] for k in by_seed.items}) == [2, 4] and len(by_seed.items) == 4

    got: list[np.ndarray] = []
    key = ("shared", (500,), 3, 0.05)
    workers = [threading.Thread(target=lambda: got.append(cache.get(key))) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(g is got[0] for g in got)


def test_a_stream_packed_with_the_earlier_preset_still_unpacks():
    # Devices and aggregators of the version before packed with plain preset 6; the
    # dictionary size (all a raw LZMA2 decoder is told) is unchanged, so either side
    # reads the other's frames.
    sym = np.random.default_rng(0).integers(0, 4, 10_001).astype(np.uint8)
    packed = fedmrn_change.pack(sym, 2)
    assert np.array_equal(fedmrn_change.unpack(packed, sym.size, 4), sym)
    per = np.zeros(-(-sym.size // 4) * 4, np.uint8)
    per[:sym.size] = sym
    rows = per.reshape(-1, 4)
    raw = np.bitwise_or.reduce([rows[:, i] << np.uint8(2 * i) for i in range(4)])
    old = lzma.compress(raw.astype(np.uint8).tobytes(), format=lzma.FORMAT_RAW,
                        filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
    assert np.array_equal(fedmrn_change.unpack(old, sym.size, 4), sym)


def test_the_probe_picks_the_step_the_whole_vector_would():
    # The probe (every 16th value) only skips steps far too fine; the chosen step, and so
    # the bytes, are those the whole vector's entropy picks.
    rng = np.random.default_rng(5)
    f = (rng.binomial(10, rng.beta(0.3, 3, 200_000)) / 10).astype(np.float32)
    w = rng.random(f.size)
    data, levels = fedmrn_change.code(f, w)
    for step in fedmrn_change.STEPS:
        sym, lo = fedmrn_change._symbols(f, step)
        if fedmrn_change._bits(sym) <= fedmrn_change.BITS:
            break
    assert len(levels) == int(sym.max()) + 1
    assert data == fedmrn_change.pack(sym, fedmrn_change.width_for(len(levels)))
