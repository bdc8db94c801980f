"""The wire format's transform (rotation) and coding (rANS) bytes: round trips and bad payloads."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from fedquant.errors import DecodeError, InvalidInputError
from fedquant.fl.models import PaperCNN
from fedquant.quant import entropy, rotation
from fedquant.quant.codec import (
    CODING_RANS,
    TRANSFORM_HADAMARD,
    VERSION,
    decode,
    describe_payload,
    encode,
    encode_with_stats,
    reseal,
)
from fedquant.quant.quantizer import dequantize, quantize
from fedquant.quant.spec import QuantSpec

KEY = 0xC0FFEE


def fix_checksum(buf: bytearray) -> bytes:
    return reseal(buf)


def update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (rng.standard_t(3, (8, 3, 3, 3)) * 0.1).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float32),
        "fc.weight": (rng.standard_t(3, (20, 300)) * 0.05).astype(np.float32),
        "odd": rng.standard_normal((3, 7)).astype(np.float32),
        "scalar": np.array(0.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "n": np.array(3, np.int64),
    }


def keys_of(seed: int, n: int) -> list[np.uint64]:
    return [np.uint64(k) for k in np.random.SeedSequence(seed).generate_state(n, np.uint64)]


def reference(
    x: np.ndarray, name: str, bits: int, rounding: str, granularity: str, key: np.uint64
) -> np.ndarray:
    """rotate -> quantize (the tensor's stream key) -> dequantize -> unrotate, by hand."""
    from unittest import mock

    rows = (
        x.reshape(x.shape[0], -1)
        if granularity == "channel" and x.ndim >= 2 and x.shape[0]
        else x.reshape(1, -1)
    )
    tk = rotation.tensor_key(KEY, name)
    y = rotation.rotate(np.ascontiguousarray(rows), tk.key)
    with mock.patch("fedquant.quant.quantizer.rng_key", return_value=key):
        q = quantize(
            y,
            bits,
            rounding=rounding,
            granularity="channel" if rows.shape[0] > 1 else "tensor",
            seed=0,
        )
    return rotation.unrotate(dequantize(q).reshape(y.shape), tk.key, rows.shape[1]).reshape(x.shape)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("entropy_coding", ["none", "rans"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_rotated_round_trip_equals_the_pipeline_by_hand(
    bits: int, rounding: str, granularity: str, entropy_coding: str
) -> None:
    upd = update()
    spec = QuantSpec(
        default_bits=bits,
        rules=(("odd", bits), ("scalar", bits), ("empty", bits)),
        rounding=rounding,
        granularity=granularity,
        rotation=True,
        entropy=entropy_coding,
    )
    enc = encode_with_stats(upd, spec, seed=7, shared_key=KEY)
    dec = decode(enc.payload, shared_key=KEY)
    keys = keys_of(7, len(upd))
    for i, (name, x) in enumerate(upd.items()):
        info = dec.info[name]
        if name in ("conv.bias", "n"):
            assert info.transform == 0 and info.coding == 0
            continue
        assert info.transform == TRANSFORM_HADAMARD
        want = reference(x, name, bits, rounding, granularity, keys[i])
        assert np.array_equal(dec.tensors[name], want), name
        assert dec.tensors[name].shape == x.shape and dec.tensors[name].dtype == np.float32
        # the MSE the client reports is that of the original values, padding excluded
        true = float(np.mean((dec.tensors[name].astype(np.float64) - x) ** 2)) if x.size else 0.0
        assert info.mse == pytest.approx(true, rel=1e-4, abs=1e-12), name
        assert enc.tensors[name].mse == info.mse
    assert describe_payload(enc.payload).info.keys() == dec.info.keys()


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_rans_coded_round_trip_equals_packed(bits: int, granularity: str) -> None:
    upd = update(1)
    base = QuantSpec(default_bits=bits, granularity=granularity, rounding="nearest")
    plain = encode_with_stats(upd, base)
    coded = encode_with_stats(upd, base.with_(entropy="rans"))
    a, b = decode(plain.payload), decode(coded.payload)
    for name in upd:
        assert np.array_equal(a.tensors[name], b.tensors[name]), name
        assert a.info[name].mse == b.info[name].mse
    # coding only where it saves bytes: never larger, per tensor and in total
    for name in upd:
        assert coded.tensors[name].nbytes <= plain.tensors[name].nbytes, name
    assert len(coded.payload) <= len(plain.payload)
    assert b.info["fc.weight"].coding == CODING_RANS  # 6,000 Student-t codes compress
    assert b.info["odd"].coding == 0  # 21 codes: the table would cost more


def test_entropy_coding_saves_what_the_entropy_says_on_a_gaussian_layer() -> None:
    x = {"w": np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)}
    for bits, h in ((2, 1.88), (4, 3.60)):
        spec = QuantSpec(default_bits=bits, rounding="nearest", entropy="rans", rotation=True)
        enc = encode_with_stats(x, spec, shared_key=KEY)
        plain = encode_with_stats(x, spec.with_(entropy="none"), shared_key=KEY)
        ratio = len(enc.payload) / len(plain.payload)
        # the payload is the codes plus ~100 bytes of header, table and states
        assert ratio == pytest.approx(h / bits, rel=0.01), (bits, ratio)


def test_paper_cnn_rotated_costs_a_few_bytes_more() -> None:
    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in PaperCNN().state_dict().items()}
    spec = QuantSpec.from_strings(bits="4-2-2-4", rounding="nearest")
    plain = encode(state, spec)
    rot = encode(state, spec.with_(rotation=True), shared_key=KEY)
    # 6-byte sub-headers on 4 tensors and fc2 padded 1000 -> 1008 (4 bytes at 4 bits)
    assert len(rot) - len(plain) == 4 * 6 + 4


def test_huge_values_are_clipped_so_the_receiver_never_overflows() -> None:
    x = {"w": np.full((1, 1000), 1e37, np.float32)}
    x["w"][0, ::2] = -1e37
    enc = encode_with_stats(x, QuantSpec(default_bits=4, rotation=True), seed=1, shared_key=KEY)
    limit = rotation.scale_limit(rotation.padded_length(1000))
    assert enc.tensors["w"].scales[0] <= limit
    dec = decode(enc.payload, shared_key=KEY)
    assert np.isfinite(dec.tensors["w"]).all() and np.isfinite(dec.info["w"].mse)
    # values whose signs undo D: the first rotated value is sqrt(65536) * 3e37
    n = 1 << 16
    aligned = 3e37 * rotation.signs_reference(rotation.tensor_key(KEY, "w").key, n)
    with pytest.raises(InvalidInputError, match="tensor 'w': .*overflow float32 once rotated"):
        encode({"w": aligned.reshape(1, n)}, QuantSpec(rotation=True), seed=1, shared_key=KEY)


# --------------------------------------------------------------------------- keys


def test_the_key_is_needed_and_checked_but_never_sent() -> None:
    upd = {"w": np.random.default_rng(0).standard_normal((4, 40)).astype(np.float32)}
    spec = QuantSpec(default_bits=3, rotation=True)
    with pytest.raises(InvalidInputError, match="needs shared_key="):
        encode(upd, spec, seed=1)
    with pytest.raises(InvalidInputError, match="shared_key=-1 is not usable"):
        encode(upd, spec, seed=1, shared_key=-1)
    p = encode(upd, spec, seed=1, shared_key=KEY)
    assert KEY.to_bytes(8, "little") not in p
    assert struct.unpack_from("<H", p, 4)[0] == VERSION == 2
    with pytest.raises(
        DecodeError,
        match=r"tensor 'w': is rotated \(transform=1\) and cannot be decoded without the shared key",
    ):
        decode(p)
    with pytest.raises(DecodeError, match="tensor 'w': was rotated with another shared key"):
        decode(p, shared_key=KEY + 1)
    with pytest.raises(DecodeError, match="another shared key"):
        describe_payload(p, shared_key=KEY + 1)
    assert describe_payload(p).info["w"].transform == TRANSFORM_HADAMARD  # reading needs no key
    with pytest.raises(InvalidInputError, match="shared_key"):
        decode(p, shared_key=1 << 64)
    # payloads without rotation ignore the key
    plain = encode(upd, QuantSpec(default_bits=3), seed=1)
    assert np.array_equal(decode(plain).tensors["w"], decode(plain, shared_key=5).tensors["w"])


def test_rotated_record_layout() -> None:
    upd = {"w": np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5)}
    p = encode(upd, QuantSpec(default_bits=3, rotation=True, rounding="nearest"), shared_key=KEY)
    fixed = 24 + 2 + 1
    assert list(p[fixed : fixed + 8]) == [1, 0, 3, 0, TRANSFORM_HADAMARD, 0, 2, 0]
    data_len_at = fixed + 8 + 16 + 4 + 4 + 8
    (data_len,) = struct.unpack_from("<Q", p, data_len_at)
    # 20 values -> padded 32 (unit 16): 6-byte sub-header + ceil(32 * 3 / 8) = 12 bytes
    assert data_len == 6 + 12
    b_log2, m_log2, check = struct.unpack_from("<BBI", p, data_len_at + 8)
    assert (1 << b_log2, 1 << m_log2) == (rotation.DEFAULT_BLOCK, rotation.DEFAULT_MIN_BLOCK)
    assert check == rotation.tensor_key(KEY, "w").check
    assert describe_payload(p).info["w"].codes == 32


# --------------------------------------------------------------------------- bad payloads


def rotated_payload(
    entropy_coding: str = "none", bits: int = 3, shape: tuple[int, ...] = (4, 40)
) -> bytes:
    upd = {"w": np.random.default_rng(3).standard_normal(shape).astype(np.float32)}
    spec = QuantSpec(default_bits=bits, rotation=True, entropy=entropy_coding, rounding="nearest")
    return encode(upd, spec, shared_key=KEY)


def coded_payload() -> bytes:
    upd = {"w": np.random.default_rng(3).standard_t(2, (50, 40)).astype(np.float32)}
    p = encode(upd, QuantSpec(default_bits=4, entropy="rans", rounding="nearest"))
    assert describe_payload(p).info["w"].coding == CODING_RANS
    return p


FIXED = 24 + 2 + 1  # the one record's name is "w"
DATALEN = FIXED + 8 + 16 + 4 + 4 + 8  # 2 dims, 1 scale
DATA = DATALEN + 8


def expect(buf: bytearray | bytes, message: str) -> None:
    data = fix_checksum(bytearray(buf))
    for fn in (decode, describe_payload):
        with pytest.raises(DecodeError, match=message):
            fn(data, shared_key=KEY)


def test_unknown_transform_coding_and_misplaced_ones() -> None:
    p = bytearray(rotated_payload())
    for pos, value, msg in (
        (FIXED + 4, 2, "transform=2 is unknown"),
        (FIXED + 5, 7, "coding=7 is unknown"),
        (FIXED + 7, 1, "reserved byte is 1"),
    ):
        buf = bytearray(p)
        buf[pos] = value
        expect(buf, msg)
    raw = bytearray(encode({"b": np.ones(3, np.float32)}, QuantSpec()))
    raw[FIXED + 4] = 1  # a raw float32 tensor cannot be rotated
    expect(raw, "only quantized tensors are transformed or entropy-coded")
    raw[FIXED + 4], raw[FIXED + 5] = 0, 1
    expect(raw, "only quantized tensors")


def test_bad_rotation_sub_headers() -> None:
    p = rotated_payload()
    buf = bytearray(p)
    buf[DATA] = 25  # block 2**25
    expect(buf, r"rotation blocks 2\*\*25 \(min 2\*\*4\) are not valid")
    buf = bytearray(p)
    buf[DATA + 1] = 17  # min > block
    expect(buf, "are not valid")
    # fewer than 6 bytes of data
    short = bytearray(p[:DATALEN]) + struct.pack("<Q", 3) + p[DATA : DATA + 3] + p[-4:]
    expect(short, "rotation sub-header truncated: 3 of 6 bytes")
    # other blocks -> another padded length -> the packed data no longer fits
    buf = bytearray(p)
    buf[DATA + 1] = 6  # unit 64: 160 values -> 192 codes
    expect(buf, "60 bytes of packed codes; 192 codes at 3 bits need 72")


def test_rotated_packed_data_is_checked() -> None:
    p = rotated_payload(bits=3, shape=(1, 20))  # 32 codes x 3 bits = 12 bytes: no spare bits
    buf = bytearray(p)
    struct.pack_into("<Q", buf, DATALEN, 6 + 11)
    expect(bytearray(buf[:-5] + buf[-4:]), "11 bytes of packed codes; 32 codes at 3 bits need 12")
    p = rotated_payload(bits=3, shape=(1, 7))  # 8 codes x 3 bits = 3 bytes exactly
    p5 = rotated_payload(bits=5, shape=(1, 3))  # 4 codes x 5 bits = 20 bits: 4 spare bits
    buf = bytearray(p5)
    buf[-5] |= 0x80
    expect(buf, "padding bits of the last byte are not zero")
    buf = bytearray(p)
    struct.pack_into("<Q", buf, DATALEN, 10**9)
    expect(buf, "data length 1000000000 but only")


def test_scales_that_would_overflow_once_rotated_back() -> None:
    buf = bytearray(rotated_payload(shape=(1, 40)))
    struct.pack_into("<f", buf, DATALEN - 12, 3e38)  # the one scale
    expect(buf, "would overflow float32 once rotated back")


def test_entropy_coded_data_is_checked() -> None:
    p = coded_payload()
    (data_len,) = struct.unpack_from("<Q", p, DATALEN)
    # a decompression bomb: the shape claims 10**12 values for the same bytes
    buf = bytearray(p)
    struct.pack_into("<QQ", buf, FIXED + 8, 10**6, 10**6)
    expect(buf, r"1000000000000 entropy-coded codes in \d+ bytes; at most 8 codes per byte")
    # a stream that decodes to more or fewer codes than the shape says
    buf = bytearray(p)
    struct.pack_into("<QQ", buf, FIXED + 8, 50, 41)
    expect(buf, "ends before all codes|corrupted")
    buf = bytearray(p)
    struct.pack_into("<QQ", buf, FIXED + 8, 50, 39)
    expect(buf, "left over|corrupted")
    # a flipped bit in the stream
    buf = bytearray(p)
    buf[DATA + data_len - 3] ^= 0x04
    expect(buf, "corrupted|left over|ends before")
    # a bad table
    buf = bytearray(p)
    buf[DATA] ^= 0x01
    expect(buf, "entropy table")


def test_rotated_and_coded_bad_stream() -> None:
    p = rotated_payload("rans", bits=3, shape=(40, 64))
    info = describe_payload(p).info["w"]
    assert info.coding == CODING_RANS and info.transform == TRANSFORM_HADAMARD
    buf = bytearray(p)
    buf[-8] ^= 0x40
    expect(buf, "corrupted|left over|ends before")
    # decoded fine with the key, and refused without it only after full validation
    assert decode(p, shared_key=KEY).tensors["w"].shape == (40, 64)
    bad = fix_checksum(buf)
    with pytest.raises(DecodeError, match="corrupted|left over|ends before"):
        decode(bad)


def test_entropy_module_bound_matches_the_codec_docstring() -> None:
    from fedquant.quant import codec

    assert entropy.MAX_CODES_PER_BYTE == 8  # "an entropy-coded one by at most 32"
    assert "at most 32" in (codec.__doc__ or "")


@pytest.mark.parametrize("n", [2, 3, 8, 16, 100, 4096])
def test_the_largest_accepted_scale_decodes_finite_values(n: int) -> None:
    # every code at the top level and the threshold at the limit: the worst case of
    # the inverse rotation (a constant block sums into one value, sqrt(N) s)
    bits = 4
    p = bytearray(rotated_payload(bits=bits, shape=(1, n)))
    padded = rotation.padded_length(n)
    struct.pack_into("<f", p, DATALEN - 12, rotation.scale_limit(padded))
    nbytes = (padded * bits + 7) // 8
    p[DATA + 6 : DATA + 6 + nbytes] = b"\xff" * nbytes
    data = fix_checksum(p)
    got = decode(data, shared_key=KEY).tensors["w"]
    assert np.isfinite(got).all()
    assert describe_payload(data, shared_key=KEY).info["w"].scales[0] == rotation.scale_limit(
        padded
    )
