"""1-bit packing shared by the codecs that send one bit per weight (sign, FedMRN masks).

Bits are packed 8 to a byte in LITTLE bit order: element ``i`` of the flattened
(C order) array is bit ``i % 8`` (value ``1 << (i % 8)``) of byte ``i // 8``.
The last byte's unused high bits are padding and must be zero: the packer writes
zeros there and the unpacker rejects anything else, because on the wire a
non-zero padding bit can only mean corruption (or a sender that counts elements
differently from us, which is just as fatal).
"""
from __future__ import annotations

import numpy as np

from device_runtime.errors import WireError


def packed_size(n: int) -> int:
    """Bytes that hold ``n`` bits."""
    return (n + 7) // 8


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """``bits`` (any shape, bool or 0/1) flattened in C order -> uint8 of shape (ceil(n/8),)."""
    flat = np.asarray(bits).reshape(-1)  # reshape, not ravel of a 0-d: 0-d becomes (1,)
    if flat.dtype != np.bool_:
        flat = flat != 0
    return np.packbits(flat, bitorder="little")


def check_bits(packed: np.ndarray, n: int, name: str = "bits") -> np.ndarray:
    """``packed`` if it is a valid packing of ``n`` bits, without unpacking it; WireError
    on a wrong length or dtype, or on non-zero padding bits. ``name`` labels the error."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise WireError(f"tensor {name!r}: expected a 1-D uint8 bit array, got "
                        f"{packed.dtype} of shape {packed.shape}")
    if packed.size != packed_size(n):
        raise WireError(f"tensor {name!r}.shape: expected ({packed_size(n)},) to hold {n} bits, "
                        f"got ({packed.size},)")
    used = n % 8
    if used and int(packed[-1]) >> used:
        raise WireError(f"tensor {name!r}: expected zero padding bits after bit {n - 1}, got "
                        f"last byte 0x{int(packed[-1]):02x} (only its low {used} bits are used)")
    return packed


def unpack_bits(packed: np.ndarray, n: int, name: str = "bits") -> np.ndarray:
    """The ``n`` bits in ``packed`` as a flat bool array (checked as ``check_bits`` does)."""
    packed = check_bits(packed, n, name)
    return np.unpackbits(packed, count=n, bitorder="little").astype(bool)


__all__ = ["pack_bits", "unpack_bits", "check_bits", "packed_size"]
