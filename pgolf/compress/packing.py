"""Bit packing of signed N-bit integer codes (N = 1..8).

Value ``v`` is stored offset-binary as ``u = v + 2^(N-1)`` (so ``[-2^(N-1), 2^(N-1)-1]``
maps onto ``[0, 2^N - 1]``) in N bits; value ``i`` occupies bits ``[i*N, (i+1)*N)`` of the
stream, and stream bit ``k`` is bit ``k % 8`` (least significant first) of byte ``k // 8``
("little-endian bit order"). The stream is ``ceil(count * N / 8)`` bytes; unused high bits
of the last byte are zero. For N = 8 this is just ``v + 128`` per byte.

Both directions are vectorised with numpy: eight values are gathered into one 64-bit
word (``8 * N <= 64``) whose low N bytes are the packed bytes, so ~20M values take well
under a second.
"""
from __future__ import annotations

import numpy as np

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    return int(bits)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes ``pack_bits`` writes for ``count`` values of ``bits`` bits."""
    return (int(count) * _check_bits(bits) + 7) // 8


def _as_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype.kind not in "iub":
        raise ValueError(f"pack_bits needs integer values, got dtype {arr.dtype}")
    return arr.reshape(-1)


def pack_bits(values, bits: int) -> bytes:
    """Pack signed integers (any shape, flattened in C order; numpy array, torch tensor or
    sequence) into ``ceil(n * bits / 8)`` bytes. Values outside
    ``[-2^(bits-1), 2^(bits-1)-1]`` raise ValueError."""
    bits = _check_bits(bits)
    arr = _as_numpy(values)
    n = arr.size
    if n == 0:
        return b""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    vmin, vmax = int(arr.min()), int(arr.max())
    if vmin < lo or vmax > hi:
        raise ValueError(f"values [{vmin}, {vmax}] do not fit {bits}-bit signed codes [{lo}, {hi}]")
    u = (arr.astype(np.int16) - lo).astype(np.uint8)  # offset binary, in [0, 2^bits)
    if bits == 8:
        return u.tobytes()
    groups = -(-n // 8)
    u8 = np.zeros(groups * 8, dtype=np.uint64)
    u8[:n] = u
    u8 = u8.reshape(groups, 8)
    word = np.zeros(groups, dtype=np.uint64)
    for j in range(8):  # value j of a group goes to bits [j*bits, (j+1)*bits) of its word
        word |= u8[:, j] << np.uint64(j * bits)
    out = word.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits]
    return out.tobytes()[:packed_nbytes(n, bits)]


def unpack_bits(data: bytes | bytearray | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` signed values as an int8 array (flat).
    ``data`` must be exactly ``ceil(count * bits / 8)`` bytes."""
    bits = _check_bits(bits)
    count = int(count)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    buf = np.frombuffer(data, dtype=np.uint8)
    need = packed_nbytes(count, bits)
    if buf.size != need:
        raise ValueError(f"{count} values of {bits} bits need {need} bytes, got {buf.size}")
    offset = 1 << (bits - 1)
    if bits == 8:
        return (buf.astype(np.int16) - offset).astype(np.int8)
    if count == 0:
        return np.zeros(0, dtype=np.int8)
    groups = -(-count // 8)
    padded = np.zeros((groups, 8), dtype=np.uint8)
    flat = np.zeros(groups * bits, dtype=np.uint8)
    flat[:need] = buf
    padded[:, :bits] = flat.reshape(groups, bits)
    word = padded.view("<u8").reshape(groups).astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((groups, 8), dtype=np.int16)
    for j in range(8):
        out[:, j] = ((word >> np.uint64(j * bits)) & mask).astype(np.int16)
    return (out.reshape(-1)[:count] - offset).astype(np.int8)
