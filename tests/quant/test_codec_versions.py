"""Wire-format versions: version 2 (CRC-32C) is written, version-1 payloads still decode.

The version-1 fixtures in ``tests/quant/data`` were made by the code before the
checksum changed (``data/make_v1_fixture.py``), with the values they decoded to.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import crc32c
import numba
import numpy as np
import pytest

from fedquant.errors import DecodeError, NonFiniteError
from fedquant.quant.codec import (
    VERSION,
    checksum,
    decode,
    decode_inspected,
    describe_payload,
    encode,
    encode_with_stats,
    reseal,
)
from fedquant.quant.spec import QuantSpec

DATA = Path(__file__).parent / "data"
KEY = 0x5EED
FIXTURES = {
    "b4-stochastic-tensor": QuantSpec(default_bits=4, rounding="stochastic"),
    "b2-nearest-channel": QuantSpec(default_bits=2, rounding="nearest", granularity="channel"),
    "b8-stochastic-channel": QuantSpec(
        default_bits=8, rounding="stochastic", granularity="channel"
    ),
    "b3-nearest-rans": QuantSpec(default_bits=3, rounding="nearest", entropy="rans"),
    "b4-stochastic-rotated": QuantSpec(default_bits=4, rounding="stochastic", rotation=True),
}


def fixture(name: str) -> bytes:
    return (DATA / f"payload_v1_{name}.bin").read_bytes()


@pytest.fixture(scope="module")
def v1_values() -> dict[str, np.ndarray]:
    with np.load(DATA / "payload_v1_values.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    with np.load(DATA / "payload_v1_inputs.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_version_1_payloads_decode_to_the_same_values(
    name: str, v1_values: dict[str, np.ndarray]
) -> None:
    p = fixture(name)
    assert struct.unpack_from("<H", p, 4)[0] == 1
    assert struct.unpack_from("<I", p, len(p) - 4)[0] == zlib.crc32(p[:-4])
    dec = decode(p, shared_key=KEY)
    assert dec.meta == {"round": 3, "client": 5}
    want = {k.split("/", 1)[1]: v for k, v in v1_values.items() if k.startswith(name + "/")}
    assert sorted(dec.tensors) == sorted(want)
    for k, v in want.items():
        assert dec.tensors[k].dtype == v.dtype and np.array_equal(dec.tensors[k], v), k
    # inspect, then decode the inspected update: the version-1 checksum is verified again
    ins = describe_payload(p, shared_key=KEY)
    again = decode_inspected(ins, shared_key=KEY)
    for k, v in want.items():
        assert np.array_equal(again.tensors[k], v), k


def test_version_1_checksum_is_still_verified() -> None:
    p = bytearray(fixture("b4-stochastic-tensor"))
    p[40] ^= 1
    with pytest.raises(DecodeError, match="checksum mismatch"):
        decode(bytes(p))
    # a version-1 payload sealed with CRC-32C (the other version's checksum) is refused
    p = bytearray(fixture("b4-stochastic-tensor"))
    struct.pack_into("<I", p, len(p) - 4, crc32c.crc32c(bytes(p[:-4])))
    with pytest.raises(DecodeError, match="checksum mismatch"):
        decode(bytes(p))
    # reseal follows the header's version
    assert reseal(p) == fixture("b4-stochastic-tensor")


def test_version_2_is_written_with_crc32c(inputs: dict[str, np.ndarray]) -> None:
    p = encode(inputs, QuantSpec(default_bits=4, rounding="stochastic"), seed=11)
    assert isinstance(p, bytes) and VERSION == 2
    assert struct.unpack_from("<H", p, 4)[0] == 2
    crc = struct.unpack_from("<I", p, len(p) - 4)[0]
    assert crc == crc32c.crc32c(p[:-4]) == checksum(p[:-4]) != zlib.crc32(p[:-4])
    # CRC-32C's check value (RFC 3720): the checksum really is Castagnoli's
    assert checksum(b"123456789") == 0xE3069283
    assert checksum(b"123456789", 1) == zlib.crc32(b"123456789")
    # a version-2 payload sealed with zlib's CRC-32 is refused
    bad = bytearray(p)
    struct.pack_into("<I", bad, len(bad) - 4, zlib.crc32(p[:-4]))
    with pytest.raises(DecodeError, match="checksum mismatch"):
        decode(bytes(bad))


@pytest.mark.parametrize("name", ["b2-nearest-channel", "b3-nearest-rans"])
def test_nearest_rounding_payloads_decode_to_the_values_of_before(
    name: str, inputs: dict[str, np.ndarray], v1_values: dict[str, np.ndarray]
) -> None:
    # nearest rounding draws no random numbers: today's payload decodes to the same values
    p = encode(inputs, FIXTURES[name], seed=11, meta={"round": 3, "client": 5})
    old = decode(fixture(name))
    new = decode(p)
    for k in inputs:
        assert np.array_equal(new.tensors[k], v1_values[f"{name}/{k}"]), k
        # the MSE is summed in another order now: equal to float32 accumulation accuracy
        assert new.info[k].mse == pytest.approx(old.info[k].mse, rel=1e-6, abs=0), k
        assert new.info[k].scales.tobytes() == old.info[k].scales.tobytes(), k
    assert len(p) == len(fixture(name))


def test_payload_is_a_fresh_immutable_bytes_object() -> None:
    x = np.random.default_rng(0).standard_normal((64, 50)).astype(np.float32)
    a = encode({"w": x, "b": x[0]}, seed=1)
    snapshot = bytes(bytearray(a))
    for s in range(3):  # later encodes must not write into an earlier payload
        encode({"w": x * (s + 2), "b": x[1]}, seed=s)
    assert a == snapshot and type(a) is bytes
    assert hash(a) == hash(snapshot)
    assert decode(a).tensors["b"].tolist() == x[0].tolist()


def test_raw_float_record_is_copied_exactly_and_checked() -> None:
    x = np.random.default_rng(1).standard_normal(300_001).astype(np.float32)  # parallel path
    x[[0, 7, -1]] = [np.float32(1e-45), -0.0, np.finfo(np.float32).max]
    res = encode_with_stats({"a": x[:3], "bias": x}, seed=0)
    got = decode(res.payload).tensors["bias"]
    assert got.tobytes() == x.tobytes()
    assert res.tensors["bias"].nbytes == 2 + 4 + 8 + 8 + 4 + 8 + 8 + 4 * x.size
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[123_456] = bad
        y[5] = bad
        with pytest.raises(NonFiniteError, match=r"tensor 'bias': input holds 2 NaN/Inf"):
            encode({"bias": y})


def test_payload_does_not_depend_on_the_thread_count() -> None:
    rng = np.random.default_rng(2)
    t = {
        "w": rng.standard_normal((600, 700)).astype(np.float32),  # > PARALLEL_MIN elements
        "b": rng.standard_normal(400_000).astype(np.float32),
    }
    saved = numba.get_num_threads()
    try:
        out = []
        for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            for spec in (
                QuantSpec(default_bits=3, rounding="stochastic"),
                QuantSpec(default_bits=8, rounding="stochastic", granularity="channel"),
            ):
                out.append(encode(t, spec, seed=9))
    finally:
        numba.set_num_threads(saved)
    half = len(out) // 2
    assert out[:half] == out[half:] or half == 0
