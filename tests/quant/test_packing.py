"""Bit packing: exact sizes, golden bytes, round trips, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fedquant.errors import InvalidInputError
from fedquant.quant import kernels
from fedquant.quant.packing import pack, packed_size, unpack


def reference_pack(codes: np.ndarray, bits: int) -> bytes:
    """Slow, obviously-correct bit-stream writer (LSB first)."""
    acc, nacc, out = 0, 0, bytearray()
    for c in codes.tolist():
        acc |= int(c) << nacc
        nacc += bits
        while nacc >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nacc -= 8
    if nacc:
        out.append(acc & 0xFF)
    return bytes(out)


def test_golden_bytes_from_docstring() -> None:
    # the worked example of fedquant.quant.packing's docstring
    assert pack(np.array([1, 2, 3, 4, 5], np.uint8), 3).tobytes() == bytes([0xD1, 0x58])
    # 2 bits: 4 codes per byte, first code in the low bits
    assert pack(np.array([3, 0, 1, 2], np.uint8), 2).tobytes() == bytes([0b10_01_00_11])
    # 4 bits: low nibble first
    assert pack(np.array([0xA, 0x5, 0xF], np.uint8), 4).tobytes() == bytes([0x5A, 0x0F])


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 13, 64, 1000, 65536 + 3, 300_001])
def test_round_trip_and_exact_size(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 1 << bits, size=n, dtype=np.uint8)
    packed = pack(codes, bits)
    assert packed.size == packed_size(n, bits) == -(-n * bits // 8)
    assert np.array_equal(unpack(packed, bits, n), codes)
    if n <= 1000:
        assert packed.tobytes() == reference_pack(codes, bits)


@pytest.mark.parametrize("bits", [1, 3, 5, 7])
def test_parallel_and_serial_kernels_agree(bits: int) -> None:
    codes = np.random.default_rng(1).integers(0, 1 << bits, 200_003, dtype=np.uint8)
    a = np.empty(packed_size(codes.size, bits), np.uint8)
    b = np.empty_like(a)
    kernels.pack.parallel(codes, bits, a)
    kernels.pack.serial(codes, bits, b)
    assert np.array_equal(a, b)


def test_padding_bits_are_zero() -> None:
    assert pack(np.array([1], np.uint8), 1).tobytes() == b"\x01"
    assert pack(np.array([7, 7, 7], np.uint8), 3).tobytes() == bytes([0xFF, 0x01])


def test_bad_input() -> None:
    with pytest.raises(InvalidInputError, match="does not fit in 2 bit"):
        pack(np.array([4], np.uint8), 2)
    with pytest.raises(InvalidInputError, match="codes must be uint8"):
        pack(np.array([1], np.int32), 2)
    with pytest.raises(InvalidInputError, match="bits=9 is not a supported bit width"):
        pack(np.array([1], np.uint8), 9)
    with pytest.raises(InvalidInputError, match="need 2 bytes, got 1"):
        unpack(np.zeros(1, np.uint8), 4, 3)
