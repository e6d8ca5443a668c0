"""Codecs through the real wire: round trips, unbiased int8, 1-bit sign, corrupt payloads."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from device_runtime import codecs, wire
from device_runtime.codecs import CodecContext
from device_runtime.codecs.bits import pack_bits, unpack_bits
from device_runtime.codecs.int8 import scale_for
from device_runtime.codecs.sign import signs_of
from device_runtime.errors import WireError
from device_runtime.registry import UnknownNameError

NAMES = ("fp32", "fp16", "int8", "sign")
FAST = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def model(seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Shapes like a real model's: a 0-d normalization mean, 1-D, 2-D and 3-D tensors."""
    rng = np.random.default_rng(seed)
    shapes = {"norm.mean": (), "fc.bias": (10,), "fc.weight": (10, 7), "conv.weight": (4, 3, 5)}
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def shapes_of(weights: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in weights.items()}


def through_wire(name: str, weights: dict, ctx: CodecContext) -> tuple[dict, wire.Frame, int]:
    """Encode, frame, unframe with the codec's wire_spec as Expect, decode."""
    codec = codecs.get(name)
    tensors, params = codec.encode(weights, ctx)
    data = wire.encode(wire.Frame("update", "j", 1, "d", name, tensors, params))
    frame = wire.decode(data, wire.Expect(codec=name, tensors=codec.wire_spec(shapes_of(weights))))
    return codec.decode(frame.tensors, frame.params, ctx), frame, len(data)


def wire_bytes(frame: wire.Frame) -> int:
    return sum(t.nbytes for t in frame.tensors.values())


def check_shapes(out: dict, weights: dict) -> None:
    assert list(out) == list(weights)
    for k, v in out.items():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32, k
        assert v.shape == weights[k].shape, k


# --- round trips -------------------------------------------------------------

@pytest.mark.parametrize("with_reference", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_shapes_and_accuracy(name, with_reference):
    ref = model(1)
    w = {k: v + model(2, 0.01)[k] for k, v in ref.items()}
    ctx = CodecContext(round=3, seed=7, reference=ref if with_reference else None)
    out, frame, _ = through_wire(name, w, ctx)
    check_shapes(out, w)
    assert frame.tensors["norm.mean"].shape == ((1,) if name == "sign" else ())
    base = ref if with_reference else {k: np.zeros_like(v) for k, v in w.items()}
    for k in w:
        delta = w[k] - base[k]
        err = np.abs(out[k] - w[k])
        if name == "fp32":
            np.testing.assert_array_equal(out[k], w[k])
        elif name == "fp16":  # float16 keeps 11 significant bits of the update
            assert (err <= np.abs(delta) * 2**-10 + 1e-6).all(), k
        elif name == "int8":
            s = float(scale_for(delta))
            assert (err <= s * (1 + 1e-5) + 1e-6).all(), k
        else:
            signs = np.where(out[k] - base[k] >= 0, 1, -1)
            np.testing.assert_array_equal(signs, np.where(delta >= 0, 1, -1))
            np.testing.assert_allclose(np.abs(out[k] - base[k]), np.abs(delta).mean(),
                                       rtol=1e-5, atol=1e-6)


@FAST
@given(arr=hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                   max_side=9),
                      elements=st.floats(-1e3, 1e3, width=32)),
       name=st.sampled_from(NAMES), seed=st.integers(0, 2**40))
def test_any_tensor_round_trips(arr, name, seed):
    ref = {"t": np.full(arr.shape, 0.5, np.float32)}
    out, _, _ = through_wire(name, {"t": arr}, CodecContext(seed=seed, reference=ref))
    check_shapes(out, {"t": arr})
    delta = arr - ref["t"]
    if name == "fp32":
        np.testing.assert_array_equal(out["t"], arr)
    elif name == "fp16":
        assert (np.abs(out["t"] - arr) <= np.abs(delta) * 2**-10 + 1e-3).all()
    elif name == "int8":
        assert (np.abs(out["t"] - arr) <= float(scale_for(delta)) * (1 + 1e-5) + 1e-4).all()
    else:
        np.testing.assert_array_equal(out["t"] >= ref["t"], delta >= 0)


def test_zero_update_and_empty_tensor():
    ref = model(0)
    w = {**ref, "empty": np.zeros((0, 3), np.float32)}
    ref = {**ref, "empty": np.zeros((0, 3), np.float32)}
    for name in NAMES:
        out, frame, _ = through_wire(name, w, CodecContext(reference=ref))
        check_shapes(out, w)
        for k in w:
            np.testing.assert_array_equal(out[k], w[k])
        if name in ("int8", "sign"):
            assert frame.params["fc.weight"]["scale"] == 0.0


def test_encode_is_deterministic_per_seed_round_and_name():
    codec, w = codecs.get("int8"), model(0)
    a, _ = codec.encode(w, CodecContext(round=1, seed=5))
    b, _ = codec.encode(w, CodecContext(round=1, seed=5))
    c, _ = codec.encode(w, CodecContext(round=2, seed=5))
    assert all(np.array_equal(a[k], b[k]) for k in w)
    assert not np.array_equal(a["fc.weight"], c["fc.weight"])


# --- int8: unbiased ----------------------------------------------------------

def test_int8_is_unbiased():
    codec, ref = codecs.get("int8"), model(3)
    rng = np.random.default_rng(4)
    # Updates that sit between grid points: round-to-nearest would be off by ~0.3 step.
    delta = {k: (rng.integers(-120, 120, v.shape) + 0.3).astype(np.float32) * 1e-3
             for k, v in ref.items()}
    w = {k: ref[k] + delta[k] for k in ref}
    n = 2000
    total = {k: np.zeros(v.shape, np.float64) for k, v in w.items()}
    for seed in range(n):
        ctx = CodecContext(round=1, seed=seed, reference=ref)
        tensors, params = codec.encode(w, ctx)
        for k, v in codec.decode(tensors, params, ctx).items():
            total[k] += v.astype(np.float64) - ref[k]
    for k in w:
        true = (w[k].astype(np.float64) - ref[k])  # the update as float32 actually holds it
        s = float(scale_for(w[k] - ref[k]))
        err = np.abs(total[k] / n - true)
        # Each draw errs by < s with variance <= s^2/4: the mean of n has std <= s/(2 sqrt n).
        assert err.mean() < s / math.sqrt(n), k
        assert err.max() < 3 * s / math.sqrt(n), k


# --- sign: 1 bit -------------------------------------------------------------

def test_sign_signs_and_size():
    rng = np.random.default_rng(5)
    ref = {"w": rng.standard_normal(10_000).astype(np.float32), "m": np.float32(0.25) * np.ones(())}
    ref["m"] = np.asarray(ref["m"], np.float32)
    delta = rng.standard_normal(10_000).astype(np.float32)
    delta[:50] = 0.0  # zero -> +1
    w = {"w": ref["w"] + delta, "m": ref["m"]}
    out, frame, _ = through_wire("sign", w, CodecContext(reference=ref))
    assert frame.tensors["w"].nbytes == 10_000 // 8 and wire_bytes(frame) <= 10_000 / 8 + 8
    signs = signs_of(frame.tensors, frame.params, shapes_of(w))
    assert signs["w"].dtype == np.int8 and signs["m"].shape == ()
    true = np.where(w["w"] - ref["w"] >= 0, 1, -1)  # as float32 computes the update
    np.testing.assert_array_equal(signs["w"], true)
    assert (signs["w"][:50] == 1).all() and signs["m"] == 1
    np.testing.assert_array_equal(np.sign(out["w"] - ref["w"]), true)


@FAST
@given(bits=hnp.arrays(np.bool_, st.integers(0, 40)))
def test_pack_unpack_bits(bits):
    packed = pack_bits(bits)
    assert packed.dtype == np.uint8 and packed.shape == ((bits.size + 7) // 8,)
    np.testing.assert_array_equal(unpack_bits(packed, bits.size), bits)


def test_unpack_rejects_padding_and_length():
    packed = pack_bits(np.ones(5, bool))
    with pytest.raises(WireError, match="padding"):
        unpack_bits(packed | np.uint8(0x80), 5)
    with pytest.raises(WireError, match="hold 17 bits"):
        unpack_bits(packed, 17)


# --- registry ----------------------------------------------------------------

def test_unknown_codec_lists_valid_names():
    with pytest.raises(UnknownNameError, match="fp16, fp32, int8, sign"):
        codecs.get("nope")


# --- corrupt payloads --------------------------------------------------------

def encoded(name: str, weights: dict, ctx: CodecContext) -> tuple[dict, dict]:
    tensors, params = codecs.get(name).encode(weights, ctx)
    return tensors, {k: dict(params.get(k, {})) for k in tensors}


@pytest.mark.parametrize("name,bad_array,reason", [
    ("int8", np.zeros((10, 7), np.float32), "dtype: expected int8"),
    ("int8", np.zeros((7, 10), np.int8), "shape: expected"),
    ("fp16", np.zeros((10, 7), np.float32), "dtype: expected float16"),
    ("sign", np.zeros(8, np.uint8), r"shape: expected \(9,\)"),
])
def test_wire_spec_rejects_wrong_dtype_or_shape(name, bad_array, reason):
    w = model(0)
    tensors, params = encoded(name, w, CodecContext())
    tensors["fc.weight"] = bad_array
    data = wire.encode(wire.Frame("update", "j", 1, "d", name, tensors, params))
    with pytest.raises(WireError, match=reason):
        wire.decode(data, wire.Expect(tensors=codecs.get(name).wire_spec(shapes_of(w))))


@pytest.mark.parametrize("name", ["int8", "sign"])
@pytest.mark.parametrize("scale,reason", [
    (-0.5, "params.scale: expected a finite number"),
    (float("nan"), "params.scale: expected a finite number"),
    (float("inf"), "params.scale: expected a finite number"),
    (1e300, "params.scale: expected a finite number"),
    pytest.param(10**400, "params.scale: expected a finite number", id="huge-int"),
    ("0.1", "params.scale: expected a number, got str"),
    (True, "params.scale: expected a number, got bool"),
    (None, "params.scale: expected a number, got nothing"),
])
def test_bad_scale_rejected(name, scale, reason):
    w, ctx = model(0), CodecContext(reference=model(1))
    tensors, params = encoded(name, w, ctx)
    if scale is None:
        del params["fc.bias"]["scale"]
    else:
        params["fc.bias"]["scale"] = scale
    with pytest.raises(WireError, match=rf"'fc.bias'.{reason}"):
        codecs.get(name).decode(tensors, params, ctx)


def test_int8_rejects_reserved_and_inconsistent_values():
    codec, ctx = codecs.get("int8"), CodecContext(reference=model(1))
    tensors, params = encoded("int8", model(0), ctx)
    tensors["fc.weight"][0, 0] = -128
    with pytest.raises(WireError, match="'fc.weight': expected values in .*-128 is reserved"):
        codec.decode(tensors, params, ctx)
    tensors["fc.weight"][0, 0] = 3
    params["fc.weight"]["scale"] = 0.0
    with pytest.raises(WireError, match="all zeros with params.scale 0"):
        codec.decode(tensors, params, ctx)


def test_sign_rejects_padding_and_bad_shape_params():
    codec, ctx = codecs.get("sign"), CodecContext()
    w = model(0)  # fc.weight: 70 bits -> 9 bytes, the last uses its low 6 bits
    tensors, params = encoded("sign", w, ctx)
    good = tensors["fc.weight"].copy()
    tensors["fc.weight"][-1] |= 0x40
    for decode in (lambda: codec.decode(tensors, params, ctx),
                   lambda: signs_of(tensors, params, shapes_of(w))):
        with pytest.raises(WireError, match="'fc.weight': expected zero padding bits"):
            decode()
    tensors["fc.weight"] = good
    for shape, reason in [([10, 8], r"expected uint8 of shape \(10,\)"),
                          ([10, -7], "non-negative integers"), ("10x7", "list of at most"),
                          ([2**40, 2**40, 0], "at most 281474976710656 elements"),
                          ([True] * 70, "non-negative integers")]:
        params["fc.weight"]["shape"] = shape
        with pytest.raises(WireError, match=reason):
            codec.decode(tensors, params, ctx)
    params["fc.weight"]["shape"] = [7, 10]  # fits the bit count, not the plan
    with pytest.raises(WireError, match=r"'fc.weight'.params.shape: expected \(10, 7\)"):
        signs_of(tensors, params, shapes_of(w))
    with pytest.raises(WireError, match=r"'fc.weight'.shape: expected \(10, 7\) \(the reference"):
        codec.decode(tensors, params, CodecContext(reference=model(1)))


def test_reference_mismatch_rejected():
    codec = codecs.get("fp16")
    tensors, params = encoded("fp16", model(0), CodecContext())
    ref = model(1)
    del ref["fc.bias"]
    with pytest.raises(WireError, match="'fc.bias': expected a name of the reference"):
        codec.decode(tensors, params, CodecContext(reference=ref))
    with pytest.raises(WireError, match="exceeds float16's range"):
        codec.encode({"x": np.float32([1e5])}, CodecContext())


def test_decoded_overflow_rejected():
    codec, ref = codecs.get("sign"), {"x": np.full(3, 3e38, np.float32)}
    tensors, params = encoded("sign", {"x": np.full(3, 3e38, np.float32)}, CodecContext())
    params["x"]["scale"] = 3e38
    with pytest.raises(WireError, match="'x': expected finite decoded weights"):
        codec.decode(tensors, params, CodecContext(reference=ref))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3), max_leaves=6)


@FAST
@given(data=st.data(), name=st.sampled_from(NAMES), with_ref=st.booleans())
def test_decode_raises_only_wire_error(data, name, with_ref):
    """Any payload that passes wire_spec (random bytes, random JSON params) decodes or
    raises WireError, nothing else."""
    codec, w = codecs.get(name), model(0)
    tensors = {}
    for k, spec in codec.wire_spec(shapes_of(w)).items():
        # The wire refuses non-finite floats before a codec sees them.
        width = {"float16": 16, "float32": 32}.get(spec.dtype)
        elements = st.floats(-6e4, 6e4, width=width) if width else None
        tensors[k] = data.draw(hnp.arrays(spec.dtype, spec.shape, elements=elements))
    params = {k: data.draw(st.one_of(
        st.fixed_dictionaries({"scale": json_values, "shape": json_values}),
        st.fixed_dictionaries({"scale": st.floats(0, 1e3), "shape": st.just(list(w[k].shape))}),
        st.dictionaries(st.sampled_from(["scale", "shape", "x"]), json_values, max_size=3)))
        for k in tensors}
    try:
        out = codec.decode(tensors, params, CodecContext(reference=model(1) if with_ref else None))
    except WireError:
        return
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in out.values())
