"""Activation codecs (EcoFed): act8 and act4 round trips, their size on the wire, and
payloads refused with a reason."""
from __future__ import annotations

import numpy as np
import pytest

from device_runtime import codecs, wire
from device_runtime.codecs import CodecContext
from device_runtime.errors import WireError

CTX = CodecContext()


def _acts(shape=(16, 8, 5), seed=0) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return np.maximum(a, 0)  # after a ReLU


@pytest.mark.parametrize("name,bits", [("act8", 8), ("act4", 4)])
def test_round_trip_error_is_at_most_half_a_step(name, bits):
    c = codecs.get(name)
    a = _acts()
    labels = np.arange(16, dtype=np.int64) % 10
    tensors, params = c.encode({"acts": a, "labels": labels}, CTX)
    back = c.decode(tensors, params, CTX)
    step = float(a.max()) / (2 ** bits - 1)
    assert back["acts"].shape == a.shape and back["acts"].dtype == np.float32
    assert np.abs(back["acts"] - a).max() <= step / 2 * (1 + 1e-6)
    assert back["acts"][a == 0].max() == 0  # zeros stay exact
    np.testing.assert_array_equal(back["labels"], labels)
    assert tensors["acts"].nbytes == a.size * bits // 8


def test_act4_odd_count_and_packing():
    c = codecs.get("act4")
    a = _acts((3, 5))  # 15 values: the last byte holds one code
    tensors, params = c.encode({"acts": a}, CTX)
    assert tensors["acts"].shape == (8,) and tensors["acts"][-1] >> 4 == 0
    assert c.decode(tensors, params, CTX)["acts"].shape == (3, 5)


def test_a_frame_of_act8_travels_and_is_checked_against_the_expected_shape():
    c = codecs.get("act8")
    a, y = _acts((4, 8, 5)), np.array([1, 2, 3, 4], np.int64)
    tensors, params = c.encode({"acts": a, "labels": y}, CTX)
    frame = wire.encode(wire.Frame("update", "j", 1, "d", "act8", tensors, params))
    spec = c.wire_spec({"acts": (4, 8, 5), "labels": wire.TensorSpec("int64", (4,))})
    got = wire.decode(frame, wire.Expect(kind="update", tensors=spec))
    np.testing.assert_array_equal(c.decode(got.tensors, got.params, CTX)["labels"], y)
    wrong = c.wire_spec({"acts": (4, 16, 5), "labels": wire.TensorSpec("int64", (4,))})
    with pytest.raises(WireError, match="acts"):
        wire.decode(frame, wire.Expect(kind="update", tensors=wrong))
    fewer = c.wire_spec({"acts": (4, 8, 5), "labels": wire.TensorSpec("int64", (3,))})
    with pytest.raises(WireError, match="labels"):
        wire.decode(frame, wire.Expect(kind="update", tensors=fewer))


@pytest.mark.parametrize("bad,why", [
    (np.array([[-0.5, 1.0]], np.float32), "non-negative activations"),
    (np.array([[np.nan, 1.0]], np.float32), "finite activations"),
])
def test_the_sender_refuses_what_the_codec_cannot_carry(bad, why):
    with pytest.raises(WireError, match=why):
        codecs.get("act8").encode({"acts": bad}, CTX)


@pytest.mark.parametrize("mutate,why", [
    (lambda t, p: p["acts"].update(scale=-1.0), "params.scale"),
    (lambda t, p: p["acts"].update(scale=float("inf")), "params.scale"),
    (lambda t, p: p["acts"].update(scale=0.0), "all zeros"),
    (lambda t, p: p["acts"].update(shape=[3, 6]), "packed"),
    (lambda t, p: p["acts"].update(shape="15"), "list of non-negative ints"),
    (lambda t, p: t["acts"].__setitem__(-1, 0xF1), "unused last nibble"),
])
def test_corrupt_act4_payloads_are_refused_with_a_reason(mutate, why):
    c = codecs.get("act4")
    tensors, params = c.encode({"acts": _acts((3, 5)) + 0.1}, CTX)
    tensors = {k: v.copy() for k, v in tensors.items()}
    mutate(tensors, params)
    with pytest.raises(WireError, match=why):
        c.decode(tensors, params, CTX)
