"""Delta encodings of weight versions (wire format 2 of protos/rlrt/v1/weights.proto).

A worker that holds version B asks for V as a delta from B. Per tensor, with E = the bytes
of B XOR the bytes of V (n elements of `itemsize` bytes, little-endian):

- "xor-zstd": zstd over the byte planes of E (byte 0 of every element, then byte 1, ...:
  the Blosc "shuffle"). An element that did not change is all-zero in every plane; one that
  moved by a few units in the last place differs only in its low mantissa byte, so the
  sign/exponent planes are runs of zeros that zstd folds away.
- "sparse": zstd over (u32 k | k u32 gaps between the indices of the changed elements, the
  first counted from -1 | the k new element values), gaps and values in byte planes too.
  Only for tensors of fewer than 2**32 elements (the server falls back to xor-zstd).

Every frame carries zstd's content checksum and size, so a corrupted payload fails to
decode (`DeltaError`) instead of rebuilding wrong bytes; the sha256 of the whole rebuilt
version (checked by the client) catches the rest. bench/weights.py measures both
encodings after real optimizer steps (docs/BENCHMARKS.md): on SmolLM2-135M at lr 2e-5, with
5-8% of bf16 values changing per step, xor-zstd is 15.8x smaller than the full bf16 version
and sparse 14.0x, but sparse encodes and decodes several times faster (its work follows the
changed elements; xor-zstd decompresses, un-shuffles and XORs every byte), so sparse is the
default (`transport.weights_delta_encoding`).

Byte buffers are numpy uint8 views; numpy's XOR and zstd release the GIL, so tensors of a
version can be encoded on a thread pool.
"""

from __future__ import annotations

import struct
import threading

import numpy as np
import zstandard

ENCODINGS: tuple[str, ...] = ("sparse", "xor-zstd")  # preferred first
FULL = "full"
# zstd level 1: levels 3 and up cost ~2x the time for a few % fewer bytes on XOR planes
# (bench/weights.py, docs/BENCHMARKS.md).
ZSTD_LEVEL = 1

_UINT = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_local = threading.local()


class DeltaError(ValueError):
    """A delta payload that cannot be applied: corrupt, truncated, or for another layout."""


def _compressor() -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not safe to share between threads: one per thread.
    c = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True,
                                                         write_content_size=True)
    return c


def _planes(a: np.ndarray, itemsize: int) -> np.ndarray:
    """[n * itemsize] uint8 -> its byte planes, contiguous."""
    return a if itemsize == 1 else np.ascontiguousarray(a.reshape(-1, itemsize).T).reshape(-1)


def _unplanes(a: np.ndarray, itemsize: int) -> np.ndarray:
    """Inverse of `_planes`."""
    return a if itemsize == 1 else np.ascontiguousarray(a.reshape(itemsize, -1).T).reshape(-1)


def _u8(buf) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)


def _xor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.size % 8 == 0:  # 8 bytes at a time when the length allows
        return np.bitwise_xor(a.view(np.uint64), b.view(np.uint64)).view(np.uint8)
    return np.bitwise_xor(a, b)


def encode(encoding: str, base, new, itemsize: int) -> bytes:
    """Encode one tensor's change. base, new: its bytes in B and V (buffers of equal length,
    a multiple of `itemsize`). Returns the payload."""
    a, b = _u8(base), _u8(new)
    if a.size != b.size or a.size % itemsize or itemsize not in _UINT:
        raise DeltaError(f"cannot encode {a.size} -> {b.size} bytes of {itemsize}-byte elements")
    if encoding == "xor-zstd":
        return _compressor().compress(_planes(_xor(a, b), itemsize))
    if encoding == "sparse":
        n = a.size // itemsize
        if n >= 1 << 32:
            raise DeltaError(f"sparse encoding needs fewer than 2**32 elements, got {n}")
        av, bv = a.view(_UINT[itemsize]), b.view(_UINT[itemsize])
        idx = np.flatnonzero(av != bv)
        gaps = np.diff(idx, prepend=-1).astype("<u4")
        values = bv[idx]
        body = struct.pack("<I", idx.size) + _planes(gaps.view(np.uint8), 4).tobytes() + \
            _planes(values.view(np.uint8), itemsize).tobytes()
        return _compressor().compress(body)
    raise DeltaError(f"unknown delta encoding {encoding!r}; known: {', '.join(ENCODINGS)}")


def _decompress(payload, limit: int) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=limit)
    except zstandard.ZstdError as err:
        raise DeltaError(f"undecodable zstd payload: {err}") from None
    return out


def apply(encoding: str, payload, held: bytearray | memoryview, itemsize: int) -> None:
    """Rebuild one tensor in place: `held` (writable, its bytes in B) becomes its bytes in V.
    Raises DeltaError on a payload that does not fit; `held` may then be half-rebuilt."""
    h = _u8(held)
    if h.size % itemsize or itemsize not in _UINT:
        raise DeltaError(f"{h.size} bytes are not whole {itemsize}-byte elements")
    if encoding == FULL:
        if len(payload) != h.size:
            raise DeltaError(f"full tensor of {len(payload)} bytes for a tensor of {h.size}")
        h[:] = _u8(payload)
        return
    if encoding == "xor-zstd":
        raw = _decompress(payload, h.size)
        if len(raw) != h.size:
            raise DeltaError(f"xor payload rebuilds {len(raw)} bytes for a tensor of {h.size}")
        x = _unplanes(_u8(raw), itemsize)
        if h.size % 8 == 0:
            hv = h.view(np.uint64)
            np.bitwise_xor(hv, x.view(np.uint64), out=hv)
        else:
            np.bitwise_xor(h, x, out=h)
        return
    if encoding == "sparse":
        n = h.size // itemsize
        raw = _u8(_decompress(payload, 4 + n * (4 + itemsize)))
        if raw.size < 4:
            raise DeltaError("sparse payload shorter than its count")
        k = int(raw[:4].view("<u4")[0])
        if k > n or raw.size != 4 + k * (4 + itemsize):
            raise DeltaError(f"sparse payload of {raw.size} bytes does not hold {k} changes of a {n}-element tensor")
        gaps = _unplanes(raw[4:4 + 4 * k], 4).view("<u4").astype(np.int64)
        values = _unplanes(raw[4 + 4 * k:], itemsize).view(_UINT[itemsize])
        if k and (gaps.min() < 1 or int(gaps.sum()) - 1 >= n):
            raise DeltaError("sparse payload has indices out of order or out of range")
        idx = np.cumsum(gaps) - 1
        h.view(_UINT[itemsize])[idx] = values
        return
    raise DeltaError(f"unknown delta encoding {encoding!r}; known: {FULL}, {', '.join(ENCODINGS)}")
