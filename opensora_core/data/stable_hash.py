"""Stable 64-bit hashes of values and strings, vectorised with numpy: the same value gives the same hash
in any process, chunking or row order (the bucket draws and the metadata fingerprint build on them)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):  # 0-d arrays warn on the intended wrap-around
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


# Polynomial string hash mod 2^64 with an odd base, so the base is invertible and each string's hash
# can be read off one running sum over a whole buffer of strings (see key_hashes).
_BASE = 0x100000001B3
_BASE_INV = pow(_BASE, -1, 1 << 64)
_HASH_CHUNK_BYTES = 1 << 16  # bytes hashed per numpy pass: small enough to stay in cache


@cache
def _base_powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(BASE^i, BASE^-i) for i < n, wrapping mod 2^64."""
    up = np.full(n, _BASE, dtype=np.uint64)
    down = np.full(n, _BASE_INV, dtype=np.uint64)
    up[0] = down[0] = 1
    return np.cumprod(up), np.cumprod(down)


def key_hashes(sample_keys: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A uint64 per key, from its UTF-8 bytes alone (so any chunking or row order gives the same values).

    Vectorised over the Arrow string buffer: h(s) = sum_i (s_i + 1) * BASE^i, computed for all strings at
    once as differences of one cumulative sum of (byte + 1) * BASE^pos, rescaled by BASE^-start; the length
    is mixed in so that strings differing only by trailing NUL bytes still differ.
    """
    arr = sample_keys if isinstance(sample_keys, pa.Array | pa.ChunkedArray) else pa.array(sample_keys)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_null(arr.type):  # an empty list
        arr = arr.cast(pa.string())
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.string())
    n = len(arr)
    out = np.empty(n, dtype=np.uint64)
    if n == 0:
        return out
    offset_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32  # read in place, no copy
    offsets = np.frombuffer(arr.buffers()[1], dtype=offset_type)[arr.offset : arr.offset + n + 1]
    offsets = offsets.astype(np.int64)
    data_buffer = arr.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.empty(0, np.uint8)
    up, down = _base_powers(_HASH_CHUNK_BYTES + 1)  # a key may start right at the end of a chunk
    lo = 0
    with np.errstate(over="ignore"):
        while lo < n:
            # as many rows as fit in one chunk of bytes (at least one row; a longer key is split below)
            hi = int(np.searchsorted(offsets, offsets[lo] + _HASH_CHUNK_BYTES, side="right")) - 1
            hi = min(max(hi, lo + 1), n)
            b0, b1 = int(offsets[lo]), int(offsets[hi])
            starts = offsets[lo:hi] - b0
            ends = offsets[lo + 1 : hi + 1] - b0
            if b1 - b0 <= _HASH_CHUNK_BYTES:
                weighted = (data[b0:b1].astype(np.uint64) + np.uint64(1)) * up[: b1 - b0]
                running = np.concatenate([np.zeros(1, np.uint64), np.cumsum(weighted, dtype=np.uint64)])
                sums = (running[ends] - running[starts]) * down[starts]
            else:  # one key longer than a chunk
                sums = np.array([_long_key_hash(data[b0:b1], up)], dtype=np.uint64)
            out[lo:hi] = sums ^ (splitmix64((ends - starts).astype(np.uint64)))
            lo = hi
    return out


def _long_key_hash(data: np.ndarray, up: np.ndarray) -> np.uint64:
    total, power = np.uint64(0), np.uint64(1)
    step = np.uint64(pow(_BASE, len(up), 1 << 64))
    for start in range(0, len(data), len(up)):
        part = data[start : start + len(up)].astype(np.uint64) + np.uint64(1)
        total += np.sum(part * up[: len(part)], dtype=np.uint64) * power
        power *= step
    return total
