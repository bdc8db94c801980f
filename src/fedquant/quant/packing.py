"""Bit packing of B-bit integer codes (1 <= B <= 8) into exactly ``ceil(n*B/8)`` bytes.

Layout: the codes form one little-endian bit stream, LSB first -- code ``j``
occupies stream bits ``[j*B, (j+1)*B)``, and byte ``b`` holds stream bits
``[8b, 8b+8)`` with bit 0 as its least significant bit. Unused high bits of the
last byte are 0. Eight codes always fill exactly ``B`` bytes.

Worked example (checked byte for byte by the tests): ``B = 3``, codes
``[1, 2, 3, 4, 5]``::

    code      1     2     3     4     5
    bits    001   010   011   100   101     (each code's bits, MSB..LSB)
    stream  bits 0-2: 1, bits 3-5: 2, bits 6-8: 3, bits 9-11: 4, bits 12-14: 5
    byte 0 = 0b11_010_001 = 0xD1  (low 2 bits of code 3 on top)
    byte 1 = 0b0_101_100_0 = 0x58 (high bit of code 3, then 4, then 5)

>>> import numpy as np
>>> pack(np.array([1, 2, 3, 4, 5], np.uint8), 3).tolist()
[209, 88]
"""

from __future__ import annotations

import numpy as np

from fedquant.errors import InvalidInputError
from fedquant.quant import kernels
from fedquant.quant.grid import check_bits


def packed_size(n: int, bits: int) -> int:
    """Number of bytes that ``n`` codes of ``bits`` bits occupy: ``ceil(n * bits / 8)``."""
    return (int(n) * int(bits) + 7) // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes (each ``< 2**bits``) into bytes; see the module docstring."""
    bits = check_bits(bits)
    c = np.ascontiguousarray(np.asarray(codes).reshape(-1))
    if c.dtype != np.uint8:
        raise InvalidInputError(f"pack: codes must be uint8, got {c.dtype}")
    if c.size and int(c.max()) >= (1 << bits):
        raise InvalidInputError(
            f"pack: code {int(c.max())} does not fit in {bits} bit(s) (max {(1 << bits) - 1})"
        )
    out = np.empty(packed_size(c.size, bits), dtype=np.uint8)
    if c.size:
        kernels.pack(c, bits, out)
    return out


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Unpack ``n`` codes of ``bits`` bits; ``packed`` must hold exactly ``ceil(n*bits/8)`` bytes."""
    bits = check_bits(bits)
    p = np.ascontiguousarray(np.asarray(packed).reshape(-1))
    if p.dtype != np.uint8:
        raise InvalidInputError(f"unpack: packed data must be uint8, got {p.dtype}")
    if n < 0 or p.size != packed_size(n, bits):
        raise InvalidInputError(
            f"unpack: {n} codes of {bits} bit(s) need {packed_size(max(n, 0), bits)} bytes, "
            f"got {p.size}"
        )
    out = np.empty(n, dtype=np.uint8)
    if n:
        kernels.unpack(p, bits, n, out)
    return out
