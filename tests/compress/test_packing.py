import numpy as np
import pytest
import torch

from pgolf.compress.packing import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", [8, 7, 6, 5, 4, 3, 2, 1])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_unpack_identity(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    v = rng.integers(lo, hi + 1, n).astype(np.int8)
    if n:
        v[0], v[-1] = lo, hi  # both ends of the range
    data = pack_bits(v, bits)
    assert isinstance(data, bytes) and len(data) == packed_nbytes(n, bits) == (n * bits + 7) // 8
    out = unpack_bits(data, bits, n)
    assert out.dtype == np.int8 and out.shape == (n,)
    assert np.array_equal(out, v)


def test_bit_order_is_little_endian_offset_binary():
    # 4 bits: 1, -2, 3 -> 9, 6, 11 -> byte0 = 9 | 6 << 4, byte1 = 11 (high nibble zero)
    assert pack_bits([1, -2, 3], 4) == bytes([0x69, 0x0B])
    # 6 bits: 0, -32 -> 32, 0 -> bits 0..5 = 100000, bits 6..11 = 0
    assert pack_bits([0, -32], 6) == bytes([0x20, 0x00])
    # 5 bits: value i at bits [5i, 5i+5): 15 (u=31) then 0 (u=16) -> 0b10000_11111
    assert pack_bits([15, 0], 5) == (31 | 16 << 5).to_bytes(2, "little")
    assert pack_bits([-128, 0, 127], 8) == bytes([0, 128, 255])


def test_accepts_torch_and_any_shape():
    t = torch.randint(-15, 16, (3, 5, 7), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    data = pack_bits(t, 5)
    assert np.array_equal(unpack_bits(data, 5, t.numel()), t.flatten().numpy())


def test_errors():
    with pytest.raises(ValueError, match="do not fit 4-bit"):
        pack_bits(np.array([8], dtype=np.int8), 4)
    with pytest.raises(ValueError, match="do not fit 6-bit"):
        pack_bits(np.array([-33]), 6)
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits([0], 9)
    with pytest.raises(ValueError, match="integer values"):
        pack_bits(np.zeros(3, dtype=np.float32), 4)
    with pytest.raises(ValueError, match="need 4 bytes, got 3"):
        unpack_bits(b"abc", 4, 7)
    with pytest.raises(ValueError, match="need 4 bytes, got 5"):
        unpack_bits(b"abcde", 4, 7)


def test_large_input_vectorised():
    v = np.random.default_rng(1).integers(-31, 32, 2_000_003).astype(np.int8)
    assert np.array_equal(unpack_bits(pack_bits(v, 6), 6, v.size), v)
