"""Exact weighted sums of packed bit vectors, without unpacking them per update.

A 1-bit update (sign bits, FedMRN mask bits) aggregates as ``sum_k w_k * b_k``
per coordinate, with integer weights ``w_k`` (sample counts, quantized voting
weights). Unpacking every update to floats would cost as much memory traffic as
an fp32 update; here the sums are kept as *bit planes* (vertical counters:
plane ``j`` holds bit ``j`` of every coordinate's sum, 64 coordinates per uint64
word) and updates are added with bitwise adders:

- an update of weight ``w`` goes into one pending group per set bit ``j`` of ``w``;
- a full group of G rows is summed by a balanced adder tree (about 6 word
  operations per row), then added, shifted by ``j``, into the planes;
- the work runs over column blocks that fit in cache.

``counts()`` turns the planes into integers once, at the end of the round.
The first few updates of a small vector go to 16-bit counters instead
(``lanes.LaneSum``), which have no fixed cost per round.
"""
from __future__ import annotations

import numpy as np

from broker_server.strategies.lanes import LANE_BYTES, LaneSum

GROUP = 64  # rows summed per adder tree
BLOCK = 2048  # uint64 words per column block (16 KiB per row)
GROW_BELOW = 65536  # bytes per row under which a pending group's buffer grows
COUNT_CHUNK = 16384  # bytes of each plane that counts() unpacks at once (128 KiB out)


def _add_numbers(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """Ripple-carry sum of two bit-sliced numbers (planes LSB first, same shapes)."""
    if len(a) < len(b):
        a, b = b, a
    out, carry = [], None
    for j, p in enumerate(a):
        if j < len(b):
            x = p ^ b[j]
            out.append(x if carry is None else x ^ carry)
            carry = (p & b[j]) if carry is None else (p & b[j]) | (carry & x)
        elif carry is None:
            out.extend(a[j:])
            break
        else:
            out.append(p ^ carry)
            carry = p & carry
    if carry is not None:
        out.append(carry)
    return out


def tree_sum(rows: np.ndarray) -> list[np.ndarray]:
    """Bit-sliced per-bit sums of ``rows`` (g, W) uint64 -> planes of shape (W,), LSB first."""
    planes = [rows]
    while planes[0].shape[0] > 1:
        if planes[0].shape[0] % 2:
            planes = [np.concatenate([p, np.zeros((1,) + p.shape[1:], p.dtype)]) for p in planes]
        planes = _add_numbers([p[0::2] for p in planes], [p[1::2] for p in planes])
    return [p[0] for p in planes]


class BitSum:
    """``sum_k w_k * bits_k`` over packed bit vectors of ``nbytes`` bytes, exactly.

    Bits are little-endian within each byte, as ``device_runtime.codecs.bits``
    packs them; coordinate ``i`` is bit ``i % 8`` of byte ``i // 8``.
    """

    def __init__(self, nbytes: int, group: int = GROUP, block: int = BLOCK):
        self.nbytes, self.group, self.block = nbytes, group, block
        self.words = (nbytes + 7) // 8
        self.planes: list[np.ndarray] = []
        self.pending: dict[int, np.ndarray] = {}
        self.filled: dict[int, int] = {}
        self.total_weight = 0
        self.lanes = LaneSum(nbytes) if nbytes <= LANE_BYTES else None

    def add(self, packed: np.ndarray, weight: int, invert: bool = False) -> None:
        """Add ``weight * bits`` (``invert``: of the complemented bits) for weight >= 0."""
        if packed.shape != (self.nbytes,) or packed.dtype != np.uint8:
            raise ValueError(f"BitSum.add: expected uint8 of shape ({self.nbytes},), got "
                             f"{packed.dtype} of shape {packed.shape}")
        weight = int(weight)
        if weight < 0:
            raise ValueError(f"BitSum.add: weight must be >= 0, got {weight}")
        self.total_weight += weight
        if self.lanes is not None and self.lanes.fits(weight):
            self.lanes.add(packed, weight, invert)
            return
        self._grow(self.total_weight.bit_length())
        j = 0
        while weight:
            if weight & 1:
                self._push(j, packed, invert)
            weight >>= 1
            j += 1

    def _grow(self, n: int) -> None:
        while len(self.planes) < n:
            self.planes.append(np.zeros(self.words, np.uint64))

    def _push(self, j: int, packed: np.ndarray, invert: bool) -> None:
        if j not in self.pending:
            # A large row's group is one empty buffer whose pages are touched only as
            # rows fill; a small row's grows by doubling, so that a small round's few
            # rows per bit of the weights stay in small, reused allocations (a whole
            # group's buffer for each of ~12 bits cost fresh pages every round).
            rows = self.group if self.words * 8 >= GROW_BELOW else min(4, self.group)
            self.pending[j] = np.empty((rows, self.words), np.uint64)
            self.filled[j] = 0
        elif self.filled[j] == len(self.pending[j]):
            grown = np.empty((min(2 * self.filled[j], self.group), self.words), np.uint64)
            grown[:self.filled[j]] = self.pending[j]
            self.pending[j] = grown
        row = self.pending[j][self.filled[j]]
        row[-1] = 0  # the bytes past nbytes must read as zero bits
        row = row.view(np.uint8)
        if invert:
            np.invert(packed, out=row[:self.nbytes])
        else:
            row[:self.nbytes] = packed
        self.filled[j] += 1
        if self.filled[j] == self.group:
            self._flush(j)

    def _flush(self, j: int) -> None:
        rows = self.pending[j][:self.filled[j]]
        # A part-filled group (settled at the end of a round) works on wider blocks:
        # the same bytes in cache, and fewer Python-level steps over a large vector.
        block = self.block * max(1, self.group // len(rows))
        for start in range(0, self.words, block):
            cols = slice(start, start + block)
            self._add_at(j, tree_sum(rows[:, cols]), cols)
        self.filled[j] = 0

    def _add_at(self, j: int, number: list[np.ndarray], cols: slice) -> None:
        """planes[j:] += number, on the words in ``cols``."""
        carry = None
        # Top planes of a tree sum may be all zero; the planes already hold any
        # sum up to total_weight, so planes past them carry nothing.
        for i, t in enumerate(number[:len(self.planes) - j]):
            p = self.planes[j + i][cols]
            x = p ^ t
            new_carry = (p & t) if carry is None else (p & t) | (carry & x)
            p[...] = x if carry is None else x ^ carry
            carry = new_carry
        i = j + min(len(number), len(self.planes) - j)
        while carry is not None and i < len(self.planes) and carry.any():
            p = self.planes[i][cols]
            new_carry = p & carry
            p ^= carry
            carry, i = new_carry, i + 1

    def settle(self) -> None:
        """Fold the lanes and every pending group into the planes (before they are
        merged or sent: partial sums travel as planes)."""
        if self.lanes is not None and self.lanes.weight:
            counts, self.lanes = self.lanes.counts(self.nbytes * 8), None
            self._grow(self.total_weight.bit_length())
            for j in range(int(counts.max()).bit_length()):
                self._push(j, np.packbits(((counts >> j) & 1).astype(np.uint8),
                                          bitorder="little"), False)
        self._flush_pending()

    def _flush_pending(self) -> None:
        for j in list(self.pending):
            if self.filled[j]:
                self._flush(j)

    def merge(self, other: "BitSum") -> None:
        """Add another sum over vectors of the same size (a worker's partial sum)."""
        if other.nbytes != self.nbytes:
            raise ValueError(f"BitSum.merge: sizes differ ({self.nbytes} vs {other.nbytes})")
        self.settle()
        other.settle()
        self.total_weight += other.total_weight
        self._grow(self.total_weight.bit_length())
        if other.planes:
            for start in range(0, self.words, self.block):
                cols = slice(start, start + self.block)
                self._add_at(0, [p[cols] for p in other.planes], cols)

    def counts(self, n: int | None = None) -> np.ndarray:
        """The sums, one per bit (the first ``n``; default all ``8 * nbytes``).

        uint32 while the total weight fits, else int64. Each plane is unpacked a
        chunk at a time to one byte per bit, and 8 planes are combined by Horner's
        rule (a = 2a + bit, most significant first) on uint64 views, 8 coordinates
        per word: a byte stays below 256 through 8 planes, so no bit crosses into
        its neighbour. The chunk keeps every temporary small enough to be reused
        from the allocator (one large unpack per round cost page faults, 3x the
        arithmetic at 100k parameters).
        """
        self._flush_pending()
        n = self.nbytes * 8 if n is None else n
        dtype = np.uint32 if self.total_weight < 2**32 else np.int64
        lanes = self.lanes.counts(n) if self.lanes is not None and self.lanes.weight else None
        if not self.planes:
            return lanes.astype(dtype, copy=False) if lanes is not None else np.zeros(n, dtype)
        out = np.empty(n, dtype)
        planes = [p.view(np.uint8) for p in self.planes]
        for start in range(0, (n + 7) // 8, COUNT_CHUNK):
            stop = min(start + COUNT_CHUNK, (n + 7) // 8)
            o = out[start * 8:stop * 8]
            for g in range(0, len(planes), 8):
                group = [p[start:stop] for p in planes[g:g + 8]]
                acc = np.unpackbits(group[-1], bitorder="little").view(np.uint64)
                for p in group[-2::-1]:
                    acc <<= np.uint64(1)
                    acc |= np.unpackbits(p, bitorder="little").view(np.uint64)
                byte = acc.view(np.uint8)[:len(o)]
                if g == 0:
                    o[...] = byte
                else:
                    o |= byte.astype(dtype) << np.array(g, dtype)
        if lanes is not None:
            out += lanes
        return out


__all__ = ["BitSum", "tree_sum"]
