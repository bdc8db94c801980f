"""The wire format pinned byte for byte: encoding fixed inputs gives the committed payloads.

The golden files in ``tests/quant/data/payload_v2_*.bin`` hold what the current
format (version 2) writes for :mod:`tests.quant.golden`'s inputs, specs, seed
and shared key. Any change to a byte -- field order, a checksum, a threshold,
the random stream of stochastic rounding, rANS or rotation -- fails here.
"""

from __future__ import annotations

import json
import struct

import crc32c
import numpy as np
import pytest

from fedquant.quant.codec import MAGIC, VERSION, decode
from tests.quant import golden


@pytest.fixture(scope="module")
def values() -> dict[str, np.ndarray]:
    with np.load(golden.DATA / "payload_v2_values.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", sorted(golden.SPECS))
def test_encode_writes_the_golden_bytes(name: str) -> None:
    want = golden.path(name).read_bytes()
    got = golden.encode_golden(name)
    assert len(got) == len(want)
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
    assert first is None, f"{name}: first differing byte at offset {first}"


@pytest.mark.parametrize("name", sorted(golden.SPECS))
def test_golden_header_and_checksum_by_hand(name: str) -> None:
    p = golden.path(name).read_bytes()
    magic, version, flags, total, count, meta_len = struct.unpack_from("<4sHHQII", p, 0)
    assert (magic, version, flags) == (MAGIC, VERSION, 0) == (b"FQNT", 2, 0)
    assert total == len(p) and count == len(golden.inputs())
    assert json.loads(p[24 : 24 + meta_len]) == golden.META
    assert struct.unpack_from("<I", p, len(p) - 4)[0] == crc32c.crc32c(p[:-4])
    # the first record: name length, then the name
    (name_len,) = struct.unpack_from("<H", p, 24 + meta_len)
    assert p[26 + meta_len : 26 + meta_len + name_len] == b"embed.weight"


@pytest.mark.parametrize("name", sorted(golden.SPECS))
def test_golden_payload_decodes_to_the_committed_values(
    name: str, values: dict[str, np.ndarray]
) -> None:
    dec = decode(golden.path(name).read_bytes(), shared_key=golden.SHARED_KEY)
    assert dec.meta == golden.META
    want = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith(name + "/")}
    assert list(dec.tensors) == list(golden.inputs()) and sorted(want) == sorted(dec.tensors)
    for k, v in want.items():
        assert dec.tensors[k].dtype == v.dtype and np.array_equal(dec.tensors[k], v), k
    # raw tensors come back exactly; quantized ones within their thresholds
    src = golden.inputs()
    for k, info in dec.info.items():
        if not info.quantized:
            assert np.array_equal(dec.tensors[k], src[k]), k
        elif not info.transform:
            bound = info.scales.astype(np.float64).max()
            assert np.abs(dec.tensors[k]).max() <= bound, k


def test_the_golden_specs_cover_every_record_layout() -> None:
    seen = set()
    for name in golden.SPECS:
        dec = decode(golden.path(name).read_bytes(), shared_key=golden.SHARED_KEY)
        for info in dec.info.values():
            seen.add((info.quantized, info.granularity.value, info.transform, info.coding))
            seen.add(info.dtype)
    assert {(True, "channel", 0, 0), (True, "tensor", 0, 1), (True, "tensor", 1, 0)} <= seen
    assert {"float32", "int64", "bool"} <= seen
