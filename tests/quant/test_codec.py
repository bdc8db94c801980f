"""The wire format: round trips, sizes, metadata, and every kind of bad payload."""

from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedquant.errors import ConfigError, DecodeError, InvalidInputError, NonFiniteError
from fedquant.fl.models import PaperCNN, float32_state_bytes
from fedquant.quant.codec import (
    MAGIC,
    decode,
    decode_inspected,
    describe_payload,
    encode,
    encode_with_stats,
    reseal,
)
from fedquant.quant.quantizer import dequantize, quantize
from fedquant.quant.spec import QuantSpec


def small_update() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "fc.weight": rng.standard_normal((5, 7)).astype(np.float32),
        "bn.num_batches_tracked": np.array(17, np.int64),
    }


def quantize_with_key(x: np.ndarray, bits: int, rounding: str, granularity: str, key: np.uint64):  # type: ignore[no-untyped-def]
    """quantize() with an explicit 64-bit stream key (what encode uses per tensor)."""
    from unittest import mock

    with mock.patch("fedquant.quant.quantizer.rng_key", return_value=np.uint64(key)):
        return quantize(x, bits, rounding=rounding, granularity=granularity, seed=0)


def fix_checksum(buf: bytearray) -> bytes:
    """Recompute total length and CRC so a test can reach the field checks behind them."""
    return reseal(buf)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_decode_of_encode_equals_dequantize_of_quantize(
    granularity: str, rounding: str, bits: int
) -> None:
    upd = small_update()
    spec = QuantSpec(default_bits=bits, rounding=rounding, granularity=granularity)
    seed = 1234
    dec = decode(encode(upd, spec, seed=seed))
    # encode derives key i of tensor i from SeedSequence(seed).generate_state(n, uint64)
    keys = np.random.SeedSequence(seed).generate_state(len(upd), np.uint64)
    for i, name in enumerate(("conv.weight", "fc.weight")):
        idx = list(upd).index(name)
        q = quantize_with_key(upd[name], bits, rounding, granularity, keys[idx])
        assert np.array_equal(dec.tensors[name], dequantize(q)), (i, name)
        assert dec.info[name].mse == pytest.approx(q.mse)
        assert np.array_equal(dec.info[name].scales, q.scales)
    assert np.array_equal(dec.tensors["conv.bias"], upd["conv.bias"])  # float32, unchanged
    assert dec.tensors["bn.num_batches_tracked"].dtype == np.int64
    assert int(dec.tensors["bn.num_batches_tracked"]) == 17


def test_paper_cnn_at_4224_is_at_least_12x_smaller() -> None:
    torch.manual_seed(0)
    model = PaperCNN()
    res = encode_with_stats(model.state_dict(), QuantSpec.from_strings("4-2-2-4"), seed=0)
    assert [i.bits for i in res.tensors.values() if i.bits <= 8] == [4, 2, 2, 4]
    f32 = float32_state_bytes(model)
    assert res.float32_nbytes == f32
    assert f32 / len(res.payload) >= 12.0
    # the quantized weights alone: 81,848 weights at ~2.03 bits -> ~15.8x
    qbytes = sum(-(-i.numel * i.bits // 8) for i in res.tensors.values() if i.bits <= 8)
    assert 81_848 * 4 / qbytes == pytest.approx(15.78, abs=0.02)
    dec = decode(res.payload)
    assert dec.nbytes == len(res.payload)
    model2 = PaperCNN()
    model2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in dec.tensors.items()})


def test_torch_state_dict_and_empty_and_scalar_tensors() -> None:
    upd = {
        "w": torch.randn(3, 4),
        "half": torch.randn(6, 2, dtype=torch.float16),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(2.5),
        "mask": torch.tensor([True, False, True]),
    }
    dec = decode(encode(upd, QuantSpec(default_bits=4, rules=(("scalar", 4),)), seed=3))
    assert dec.tensors["empty"].shape == (0, 5)
    assert dec.tensors["scalar"].shape == () and float(dec.tensors["scalar"]) == pytest.approx(2.5)
    assert dec.info["half"].dtype == "float16" and dec.info["half"].bits == 4
    assert dec.tensors["mask"].dtype == bool and dec.tensors["mask"].tolist() == [True, False, True]


def test_meta_round_trip_and_determinism() -> None:
    upd = small_update()
    meta = {"round": 3, "client": "c-7", "loss": 0.25, "ok": True, "none": None}
    a = encode(upd, QuantSpec(), seed=5, meta=meta)
    assert a == encode(upd, QuantSpec(), seed=5, meta=meta)
    assert a != encode(upd, QuantSpec(), seed=6, meta=meta)
    assert decode(a).meta == meta


def test_spec_rules_and_layer_bits() -> None:
    upd = small_update()
    spec = QuantSpec.from_strings("3-5", rules="conv.bias=8")
    dec = decode(encode(upd, spec, seed=0))
    assert {n: i.bits for n, i in dec.info.items()} == {
        "conv.weight": 3,
        "conv.bias": 8,
        "fc.weight": 5,
        "bn.num_batches_tracked": 64,
    }
    with pytest.raises(
        ConfigError,
        match=r"bits: '4-2-2' gives 3 per-layer widths but the model has 2 quantizable tensors \(conv.weight, fc.weight\)",
    ):
        encode(upd, QuantSpec.from_strings("4-2-2"), seed=0)


def test_encode_bad_input() -> None:
    upd = small_update()
    upd["fc.weight"][1, 2] = np.nan
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        encode(upd, QuantSpec(), seed=0)
    upd = small_update()
    upd["conv.bias"][0] = np.inf
    with pytest.raises(NonFiniteError, match="tensor 'conv.bias'.*NaN/Inf"):
        encode(upd, QuantSpec(), seed=0)
    with pytest.raises(InvalidInputError, match=r"seed=-1 is not usable"):
        encode(small_update(), QuantSpec(), seed=-1)
    with pytest.raises(InvalidInputError, match="has dtype complex64"):
        encode({"z": np.zeros(3, np.complex64)}, QuantSpec(), seed=0)
    with pytest.raises(InvalidInputError, match="meta"):
        encode(small_update(), QuantSpec(), seed=0, meta={"x": [1, 2]})
    with pytest.raises(
        ConfigError, match="default_bits: default_bits=0 is not a supported bit width"
    ):
        QuantSpec(default_bits=0)
    with pytest.raises(ConfigError, match="method"):
        QuantSpec(method="best")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- bad payloads


@pytest.fixture
def payload() -> bytes:
    return encode(
        {"layer.weight": np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)},
        QuantSpec(default_bits=3),
        seed=1,
    )


# offsets inside the single-record payload above (no metadata): header 24, name_len 2, name 12
REC = 24
FIXED = (
    REC + 2 + len("layer.weight")
)  # dtype, kind, bits, granularity, transform, coding, ndim, reserved
DIMS = FIXED + 8
NSCALES = DIMS + 16
SCALES = NSCALES + 4
MSE = SCALES + 4
DATALEN = MSE + 8


def test_layout_offsets_are_what_the_tests_assume(payload: bytes) -> None:
    assert payload[:4] == MAGIC
    assert payload[FIXED + 2] == 3  # bits
    assert struct.unpack_from("<QQ", payload, DIMS) == (4, 6)
    assert struct.unpack_from("<Q", payload, DATALEN)[0] == 9  # ceil(24 * 3 / 8)
    assert len(payload) == DATALEN + 8 + 9 + 4


def test_truncated(payload: bytes) -> None:
    for cut in (0, 3, 10, 27, len(payload) - 1):
        with pytest.raises(DecodeError, match="truncated|inconsistent length"):
            decode(payload[:cut])


def test_corrupted(payload: bytes) -> None:
    for pos in (FIXED + 2, DATALEN + 10, len(payload) - 2):
        buf = bytearray(payload)
        buf[pos] ^= 0x40
        with pytest.raises(DecodeError, match="checksum mismatch: the payload is corrupted"):
            decode(bytes(buf))


def test_wrong_magic_and_version_and_flags(payload: bytes) -> None:
    with pytest.raises(DecodeError, match=r"wrong magic b'PK\\x03\\x04'"):
        decode(b"PK\x03\x04" + payload[4:])
    buf = bytearray(payload)
    for version in (0, 3, 0xFFFF):
        struct.pack_into("<H", buf, 4, version)
        with pytest.raises(
            DecodeError,
            match=f"unknown format version {version}; this fedquant reads versions 1, 2",
        ):
            decode(fix_checksum(buf))
    buf = bytearray(payload)
    struct.pack_into("<H", buf, 6, 1)
    with pytest.raises(DecodeError, match="header flags"):
        decode(fix_checksum(buf))


def test_inconsistent_lengths(payload: bytes) -> None:
    buf = bytearray(payload)
    struct.pack_into("<Q", buf, 8, len(payload) + 5)
    with pytest.raises(DecodeError, match="inconsistent length: header says"):
        decode(bytes(buf))
    # data_len that disagrees with the shape
    buf = bytearray(payload)
    struct.pack_into("<Q", buf, DATALEN, 10)
    with pytest.raises(DecodeError, match="data length 10 does not match shape"):
        decode(fix_checksum(buf))
    # trailing junk after the last record (with a consistent header)
    buf = bytearray(payload[:-4] + b"\x00\x00\x00" + payload[-4:])
    with pytest.raises(DecodeError, match="unexplained byte"):
        decode(fix_checksum(buf))
    # more tensors claimed than bytes could hold
    buf = bytearray(payload)
    struct.pack_into("<I", buf, 16, 10**6)
    with pytest.raises(DecodeError, match="claims 1000000 tensors"):
        decode(fix_checksum(buf))


@pytest.mark.parametrize("bits", [0, 9, 31, 255])
def test_bits_out_of_range(payload: bytes, bits: int) -> None:
    buf = bytearray(payload)
    buf[FIXED + 2] = bits
    with pytest.raises(DecodeError, match=f"bits={bits} out of range; expected 1..8"):
        decode(fix_checksum(buf))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_scale_and_mse(payload: bytes, value: float) -> None:
    buf = bytearray(payload)
    struct.pack_into("<f", buf, SCALES, value)
    with pytest.raises(DecodeError, match="scales must be finite and >= 0"):
        decode(fix_checksum(buf))
    buf = bytearray(payload)
    struct.pack_into("<d", buf, MSE, value)
    with pytest.raises(DecodeError, match="mse=.*expected a finite value >= 0"):
        decode(fix_checksum(buf))


def test_absurd_shape_is_refused_before_allocating(payload: bytes) -> None:
    # 10**12 claimed elements with a data length that matches them: the decoder
    # must notice that the bytes are not there rather than try to allocate 4 TB
    buf = bytearray(payload)
    struct.pack_into("<QQ", buf, DIMS, 10**6, 10**6)
    struct.pack_into("<I", buf, NSCALES, 10**6)
    buf[FIXED + 3] = 1  # per channel: 10**6 scales claimed
    with pytest.raises(
        DecodeError, match=r"truncated in tensor 'layer.weight' scales|needs .* bytes"
    ):
        decode(fix_checksum(buf))
    buf = bytearray(payload)
    struct.pack_into("<QQ", buf, DIMS, 10**12, 1)
    struct.pack_into("<I", buf, NSCALES, 1)
    buf[FIXED + 3] = 0  # per tensor: one scale
    struct.pack_into("<Q", buf, DATALEN, -(-(10**12) * 3 // 8))
    with pytest.raises(
        DecodeError,
        match=r"shape \(1000000000000, 1\) needs 375000000000 data bytes but only 9 remain",
    ):
        decode(fix_checksum(buf))
    buf = bytearray(payload)
    struct.pack_into("<Q", buf, DIMS, 2**60)
    with pytest.raises(DecodeError, match="absurd shape"):
        decode(fix_checksum(buf))


def test_other_field_checks(payload: bytes) -> None:
    cases = [
        (FIXED + 0, 99, "unknown dtype code 99"),
        (FIXED + 1, 7, "kind 7 is not valid"),
        (FIXED + 3, 5, "granularity code 5 is not valid"),
        # transform 1 / coding 1 are rotation / rANS (tests/quant/test_codec_extended.py)
        (FIXED + 4, 2, "transform=2 is unknown"),
        (FIXED + 5, 2, "coding=2 is unknown"),
        (FIXED + 7, 1, "reserved byte is 1; expected 0"),
        (FIXED + 6, 40, "ndim=40; at most 16"),
    ]
    for pos, value, msg in cases:
        buf = bytearray(payload)
        buf[pos] = value
        with pytest.raises(DecodeError, match=msg):
            decode(fix_checksum(buf))
    buf = bytearray(payload)
    struct.pack_into("<I", buf, NSCALES, 2)
    with pytest.raises(DecodeError, match="2 scale"):
        decode(fix_checksum(buf))
    buf = bytearray(payload)
    buf[REC + 2] = 0xFF  # invalid UTF-8 in the name
    with pytest.raises(DecodeError, match="name is not valid UTF-8"):
        decode(fix_checksum(buf))
    buf = bytearray(payload)
    buf[-5] |= 0x80  # 24 codes x 3 bits = 72 bits = 9 bytes exactly: no padding here
    decode(fix_checksum(buf))  # still valid (just different codes)


def test_padding_bits_must_be_zero() -> None:
    p = encode({"w": np.ones((1, 5), np.float32)}, QuantSpec(default_bits=3, rounding="nearest"))
    buf = bytearray(p)
    buf[-5] |= 0x80  # 15 bits used of 16: the top bit is padding
    with pytest.raises(DecodeError, match="padding bits of the last byte are not zero"):
        decode(fix_checksum(buf))


def test_duplicate_names_and_bad_meta() -> None:
    one = encode({"a": np.zeros(2, np.float32)}, QuantSpec())
    rec = one[24:-4]
    buf = bytearray(one[:24] + rec + rec + one[-4:])
    struct.pack_into("<I", buf, 16, 2)
    with pytest.raises(DecodeError, match="tensor name 'a' appears twice"):
        decode(fix_checksum(buf))
    meta = b'{"x": NaN}'
    buf = bytearray(one[:24] + meta + rec + one[-4:])
    struct.pack_into("<I", buf, 20, len(meta))
    with pytest.raises(DecodeError, match="metadata is not valid UTF-8 JSON"):
        decode(fix_checksum(buf))
    meta = b"[1, 2]"
    buf = bytearray(one[:24] + meta + rec + one[-4:])
    struct.pack_into("<I", buf, 20, len(meta))
    with pytest.raises(DecodeError, match="metadata must be a JSON object"):
        decode(fix_checksum(buf))


def test_raw_float_with_nan_is_refused() -> None:
    p = encode({"b": np.ones(3, np.float32)}, QuantSpec())
    buf = bytearray(p)
    struct.pack_into("<f", buf, len(buf) - 8, float("nan"))
    with pytest.raises(DecodeError, match="float32 data holds NaN/Inf"):
        decode(fix_checksum(buf))


def test_not_bytes() -> None:
    with pytest.raises(DecodeError, match="expected bytes, got str"):
        decode("FQNT")  # type: ignore[arg-type]


def test_random_garbage_never_crashes() -> None:
    rng = np.random.default_rng(0)
    good = encode(small_update(), QuantSpec(), seed=0)
    for i in range(3000):
        buf = bytearray(good)
        for _ in range(rng.integers(1, 6)):
            buf[rng.integers(0, len(buf))] = rng.integers(0, 256)
        if i % 2:
            buf = bytearray(fix_checksum(buf)) if len(buf) >= 28 else buf
        try:
            decode(bytes(buf))
        except DecodeError:
            pass


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec.from_strings("4-2"),
        QuantSpec.from_strings("3", granularity="channel", rounding="nearest"),
        QuantSpec.from_strings("2", rotation=True),
        QuantSpec.from_strings("4", entropy="rans"),
        QuantSpec.from_strings("8", rotation=True, entropy="rans", granularity="channel"),
    ],
    ids=["4-2", "channel", "rotation", "rans", "all"],
)
def test_decode_inspected_equals_decode(spec: QuantSpec) -> None:
    upd = small_update()
    upd["flag"] = np.array([True, False, True])
    upd["count"] = np.array(7, dtype=np.int64)
    payload = encode(upd, spec, seed=3, meta={"round": 2}, shared_key=99)
    full = decode(payload, shared_key=99)
    seen = describe_payload(
        bytearray(payload)
    )  # without the key: the key check waits for the values
    assert seen.tensors == {}
    got = decode_inspected(seen, shared_key=99)
    assert got.info is seen.info and list(got.info) == list(full.info)
    for name, info in full.info.items():
        mine = got.info[name]
        assert replace(mine, scales=None) == replace(info, scales=None)
        np.testing.assert_array_equal(mine.scales, info.scales)
    assert got.meta == full.meta and got.nbytes == full.nbytes
    assert list(got.tensors) == list(full.tensors)
    for name, value in full.tensors.items():
        assert got.tensors[name].dtype == value.dtype and got.tensors[name].shape == value.shape
        np.testing.assert_array_equal(got.tensors[name], value)


def test_decode_inspected_refuses_what_decode_refuses() -> None:
    payload = encode(
        small_update(), QuantSpec.from_strings("2", rotation=True), seed=1, shared_key=5
    )
    with pytest.raises(DecodeError, match="without the shared key"):
        decode_inspected(describe_payload(payload))
    with pytest.raises(DecodeError, match="another shared key"):
        decode_inspected(describe_payload(payload), shared_key=6)
    with pytest.raises(InvalidInputError, match="not made by codec.describe_payload"):
        decode_inspected(decode(payload, shared_key=5))
    # the buffer changed after it was inspected (a server reusing it): refused, not misread
    buf = bytearray(payload)
    seen = describe_payload(buf)
    buf[-10] ^= 0xFF
    with pytest.raises(DecodeError, match="changed after it was inspected"):
        decode_inspected(seen, shared_key=5)
