"""The payload layout walker and reseal, checked against the golden payloads' bytes."""

from __future__ import annotations

import doctest
import struct

import crc32c
import pytest

from fedquant.errors import DecodeError
from fedquant.quant import wire
from fedquant.quant.codec import decode
from tests.quant import golden


def payload(name: str = "b4-stochastic-channel") -> bytes:
    return golden.path(name).read_bytes()


def test_module_examples() -> None:
    assert doctest.testmod(wire).failed == 0


@pytest.mark.parametrize("name", sorted(golden.SPECS))
def test_walk_finds_every_record_where_decode_says_it_is(name: str) -> None:
    p = payload(name)
    layout = wire.walk(p)
    assert layout is not None
    assert layout.header == wire.Header(b"FQNT", 2, 0, len(p), 7, layout.header.meta_len)
    info = decode(p, shared_key=golden.SHARED_KEY).info
    assert [bytes(r.name).decode() for r in layout.records] == list(info)
    pos = wire.HEADER.size + layout.header.meta_len
    for rec, i in zip(layout.records, info.values(), strict=True):
        assert rec.start == pos and rec.end - rec.start == i.nbytes
        assert rec.dims == i.shape and rec.fixed[2] == i.bits and rec.n_scales == i.scales.size
        assert struct.unpack_from("<d", p, rec.mse_at)[0] == i.mse
        assert struct.unpack_from("<Q", p, rec.mse_at + 8)[0] == rec.data_len
        pos = rec.end
    assert layout.tail_at == pos == layout.crc_at == len(p) - 4


def test_fields_are_at_their_offsets() -> None:
    p = payload()
    layout = wire.walk(p)
    assert layout is not None
    fields = {f.name: f for f in layout.fields()}
    assert struct.unpack_from("<I", p, fields["n_tensors"].offset)[0] == 7
    rec = layout.records[1]
    f = fields["tensor[1].ndim"]
    assert p[f.offset] == len(rec.dims) == 4
    f = fields["tensor[1].dims[0]"]
    assert struct.unpack_from(f.fmt, p, f.offset)[0] == 3 and f.size == 8
    assert fields["tensor[1].scales[2]"].offset == rec.scales_at + 8


def test_walk_is_lenient_and_read_record_is_not() -> None:
    p = payload()
    full = wire.walk(p)
    assert full is not None
    cut = p[: full.records[2].end + 10] + p[-4:]  # the first three records and 10 bytes fit
    layout = wire.walk(cut)
    assert layout is not None and len(layout.records) == 3
    assert layout.tail_at == full.records[2].end and layout.crc_at == len(cut) - 4
    assert wire.walk(p[:20]) is None
    cur = wire.Cursor(memoryview(cut), layout.tail_at, len(cut) - 4)
    with pytest.raises(
        DecodeError, match=r"payload truncated in tensor #3: need 8 byte\(s\) at offset \d+, 1 left"
    ):
        wire.read_record(cur, "tensor #3")


def test_reseal_fixes_length_and_checksum_of_the_header_version() -> None:
    p = bytearray(payload())
    p += b"\0\0"  # two more bytes: length and checksum now wrong
    sealed = wire.reseal(p)
    assert struct.unpack_from("<Q", sealed, 8)[0] == len(sealed)
    assert struct.unpack_from("<I", sealed, len(sealed) - 4)[0] == crc32c.crc32c(sealed[:-4])
    only_len = wire.reseal(p, crc=False)
    assert only_len[:-4] == sealed[:-4] and only_len[-4:] == bytes(p[-4:])
    only_crc = wire.reseal(p, length=False)
    assert only_crc[8:16] == bytes(p[8:16])
    assert wire.reseal(b"short") == b"short"
