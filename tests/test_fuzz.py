"""Fuzzing of the wire format and the server's ingest path.

* the corpus in ``tests/fuzz_corpus`` replays clean through decode/inspect/aggregate;
* a CI-sized run of 100k generated inputs finds nothing;
* hypothesis drives single-field rewrites and valid payloads of any shape;
* one regression test per bug the fuzzer found in ``codec.py``, whose input is
  also kept in the corpus;
* the harness's own checks can fail (a crash, a disagreement, a hang, an
  excessive allocation planted on purpose are all reported).
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedquant.errors import DecodeError
from fedquant.quant import codec
from fedquant.quant.codec import decode, describe_payload, encode
from fedquant.quant.quantizer import Granularity, dequantize_packed
from fedquant.quant.spec import QuantSpec
from fedquant.quant.wire import reseal
from fedquant.tools import fuzz
from fedquant.tools.fuzz import (
    DECODE_MEM_FACTOR,
    MAX_CORPUS_BYTES,
    MEM_SLACK,
    check_input,
    field_offsets,
    run_fuzz,
    seed_payloads,
)

CORPUS_DIR = Path(__file__).parent / "fuzz_corpus"
CORPUS = sorted(CORPUS_DIR.glob("*.bin"))


def corpus_name(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()[:20]}.bin"


# --------------------------------------------------------------------------- corpus


def test_corpus_is_a_few_dozen_small_files_named_by_content() -> None:
    assert 24 <= len(CORPUS) <= 200
    for path in CORPUS:
        data = path.read_bytes()
        assert len(data) < MAX_CORPUS_BYTES, path.name
        assert path.name == corpus_name(data)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem[:8])
def test_corpus_replays_with_documented_exceptions_only(path: Path) -> None:
    # decode, inspect and aggregate, with the oracles and the memory bound
    assert check_input(path.read_bytes()) == []


# --------------------------------------------------------------------------- CI-sized run


@pytest.mark.slow
def test_ci_run_of_100k_inputs_finds_nothing() -> None:
    report = run_fuzz(100_000, seed=20240607)  # ~17 s of CPU, 20-30 s on 2 shared cores
    assert report.ok, report.summary()
    assert report.runs == 100_000
    # most inputs must get past the length and checksum into the field parser,
    # and a good share must be accepted (they exercise dequantize and aggregate)
    assert report.past_checksum + report.accepted > 0.7 * report.runs, report.summary()
    assert report.accepted > 0.08 * report.runs, report.summary()
    assert report.mem_checks > 100
    # the normalized messages reached: (nearly) every check of the decoder
    refused = {s for s in report.signatures if s.startswith("DecodeError")}
    assert len(refused) >= 60, sorted(refused)
    for needle in (
        "checksum mismatch",
        "absurd shape",
        "padding bits",
        "appears twice",
        "per-channel scales need",
        "non-finite number",
        "needs N data bytes but only N remain",
    ):
        assert any(needle in s for s in refused), needle


# --------------------------------------------------------------------------- properties

SEEDS = seed_payloads()
FIELDS = [(i, f) for i, p in enumerate(SEEDS) for f in field_offsets(p)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS), st.integers(0, 2**64 - 1), st.booleans())
def test_any_value_in_any_field_is_handled(
    field_ref: tuple[int, fuzz.Field], value: int, as_float: bool
) -> None:
    index, f = field_ref
    buf = bytearray(SEEDS[index])
    if f.fmt in ("<f", "<d") and as_float:
        # reinterpret the integer's low bits as a float: NaNs, infinities, subnormals
        raw = (value & ((1 << (8 * f.size)) - 1)).to_bytes(f.size, "little")
        buf[f.offset : f.offset + f.size] = raw
    else:
        buf[f.offset : f.offset + f.size] = (value % (1 << (8 * f.size))).to_bytes(f.size, "little")
    data = reseal(buf) if f.name != "total_len" else bytes(buf)
    assert check_input(data, memory=False) == [], f.name


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 9), min_size=0, max_size=4),
    st.integers(1, 8),
    st.sampled_from(list(Granularity)),
    st.integers(0, 2**32 - 1),
)
def test_valid_payloads_pass_every_check(
    shape: list[int], bits: int, granularity: Granularity, seed: int
) -> None:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    spec = QuantSpec(default_bits=bits, granularity=granularity, rules=(("*", bits),))
    if granularity is Granularity.CHANNEL and (x.ndim < 2 or x.shape[0] == 0):
        spec = QuantSpec(default_bits=bits, rules=(("*", bits),))
    p = encode({"x": x}, spec, seed=seed)
    assert check_input(p) == []
    info = describe_payload(p).info["x"]
    raw = np.frombuffer(p, np.uint8)[len(p) - 4 - (math.prod(shape) * bits + 7) // 8 : -4]
    reference = dequantize_packed(raw, tuple(shape), bits, info.scales)
    assert np.array_equal(decode(p).tensors["x"], reference)


@pytest.mark.parametrize("index", range(len(SEEDS)))
def test_every_truncation_is_refused(index: int) -> None:
    # cutting a valid payload anywhere, even with length and CRC made to match,
    # must be noticed: nothing silently decodes to fewer tensors
    p = SEEDS[index]
    for cut in range(24, len(p) - 4):
        data = reseal(p[:cut] + b"\0\0\0\0")
        with pytest.raises(DecodeError):
            decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_decode_error_only(data: bytes) -> None:
    assert check_input(data, memory=False) == []
    assert check_input(reseal(b"FQNT\x01\x00\x00\x00" + data), memory=False) == []


def test_seed_payloads_parse_and_rebuild_exactly() -> None:
    for p in SEEDS:
        model = fuzz._parse(p)
        assert model is not None
        assert model.to_bytes() == p
        decode(p, shared_key=fuzz.SHARED_KEY)


def test_mutator_is_deterministic_and_reaches_the_field_parser() -> None:
    import random

    a = fuzz.Mutator(SEEDS, random.Random(5))
    b = fuzz.Mutator(SEEDS, random.Random(5))
    xs = [a.mutate()[0] for _ in range(2000)]
    assert xs == [b.mutate()[0] for _ in range(2000)]
    crc_ok = 0
    for x in xs:
        try:
            decode(x)
            crc_ok += 1
        except DecodeError as e:
            crc_ok += "checksum" not in str(e) and "header says" not in str(e)
    assert crc_ok > 0.8 * len(xs)


# --------------------------------------------------------------------------- regressions


def one_tensor(
    shape: tuple[int, ...], *, bits: int = 4, granularity: Granularity = Granularity.TENSOR
) -> bytes:
    x = np.linspace(-1, 1, math.prod(shape), dtype=np.float32).reshape(shape)
    return encode({"w": x}, QuantSpec(default_bits=bits, granularity=granularity), seed=0)


def with_shape(payload: bytes, shape: tuple[int, ...], n_scales: int | None = None) -> bytes:
    """Rewrite the single record's shape (and scale count), data length 0 and no data."""
    model = fuzz._parse(payload)
    assert model is not None
    rec = model.records[0]
    rec.dims = list(shape)
    rec.fixed[6] = len(shape)
    if n_scales is not None:
        rec.n_scales = n_scales
        rec.scales = b"\0\0\x80\x3f" * n_scales
    rec.data_len, rec.data = 0, b""
    return reseal(model.to_bytes())


#: corpus files of the bugs the fuzzer found in codec.py: what decode must say now
#: (``None``: a valid payload, checked for its memory bound)
REGRESSIONS = {
    "3cb40284766c7f358741.bin": r"absurd shape \(0, 281474976710656, 281474976710656\)",
    "c7cdbb16ad629e027f5e.bin": r"absurd shape \(0, 1099511627776, ",
    "9f8806f8f7921275adaf.bin": r"per-channel scales need >= 2 dims, shape \(4,\)",
    "012503c137b180e2a37b.bin": r"per-channel scales need >= 2 dims, shape \(\)",
    "e33d2bf828f4e19af02b.bin": r"metadata is not valid UTF-8 JSON: non-finite number 1e999",
    "122dadb1184064e4d626.bin": None,  # 8 bits per channel, 96 rows of 1
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regressions_are_kept_in_the_corpus(name: str) -> None:
    data = (CORPUS_DIR / name).read_bytes()
    assert check_input(data) == []
    expected = REGRESSIONS[name]
    if expected is None:
        decode(data)
        return
    for fn in (decode, describe_payload):
        with pytest.raises(DecodeError, match=expected):
            fn(data)


@pytest.mark.parametrize("shape", [(0, 2**48, 2**48), (0,) + (2**40,) * 15, (2**24, 0, 2**24, 2)])
def test_zero_size_tensor_with_huge_dims_is_an_absurd_shape(shape: tuple[int, ...]) -> None:
    # was: inspect accepted it and decode raised numpy's ValueError "array is too big"
    data = with_shape(one_tensor((0, 3)), shape)
    for fn in (decode, describe_payload):
        with pytest.raises(DecodeError, match=r"absurd shape \(0, |absurd shape \(16777216, 0"):
            fn(data)


def test_zero_size_tensor_with_large_but_sane_dims_decodes() -> None:
    data = with_shape(one_tensor((0, 3)), (0, 2**24, 2**24))
    assert decode(data).tensors["w"].shape == (0, 2**24, 2**24)


@pytest.mark.parametrize("shape", [(4,), ()])
def test_per_channel_needs_two_dims_not_an_index_error(shape: tuple[int, ...]) -> None:
    # was: IndexError (shape[0] of a 0-d shape) for ndim 0
    data = with_shape(one_tensor((4, 3), granularity=Granularity.CHANNEL), shape, n_scales=4)
    with pytest.raises(DecodeError, match="per-channel scales need >= 2 dims"):
        decode(data)


def test_meta_number_overflowing_to_inf_is_refused() -> None:
    # was: accepted, decode(...).meta == {"x": inf} although encode refuses non-finite meta
    meta = b'{"x":1e999}'
    plain = encode({"b": np.ones(2, np.float32)}, QuantSpec())
    with pytest.raises(
        DecodeError, match="metadata is not valid UTF-8 JSON: non-finite number 1e999"
    ):
        decode(reseal(plain[:20] + struct.pack("<I", len(meta)) + meta + plain[24:]))


def test_non_contiguous_and_released_memoryviews() -> None:
    # was: TypeError "memoryview: casts are restricted to C-contiguous views"
    p = SEEDS[0]
    wide = np.zeros(2 * len(p), np.uint8)
    wide[::2] = np.frombuffer(p, np.uint8)
    strided = wide.data[::2]
    assert not strided.c_contiguous
    got, want = decode(strided), decode(p)
    assert got.info.keys() == want.info.keys()
    assert all(np.array_equal(got.tensors[k], want.tensors[k]) for k in want.tensors)
    view = memoryview(p)
    view.release()
    with pytest.raises(DecodeError, match="unusable memoryview: operation forbidden"):
        decode(view)


@pytest.mark.parametrize("bits", [3, 8])
def test_per_channel_short_rows_decode_in_bounded_memory(bits: int) -> None:
    # was: a level table of 2**bits float levels per row, 600x the payload at 8 bits
    p = one_tensor((4096, 1), bits=bits, granularity=Granularity.CHANNEL)
    decode(p)
    tracemalloc.start()
    try:
        got = decode(p).tensors["w"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= DECODE_MEM_FACTOR * len(p) + MEM_SLACK, (peak, len(p))
    # same values as the level-table path, bit for bit
    info = describe_payload(p).info["w"]
    raw = np.frombuffer(p, np.uint8)[len(p) - 4 - (4096 * bits + 7) // 8 : -4]
    assert np.array_equal(got, dequantize_packed(raw, (4096, 1), bits, info.scales))


# --------------------------------------------------------------------------- the checks can fail


def test_check_input_reports_an_undocumented_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(payload: bytes, **kwargs: object) -> codec.DecodedUpdate:
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(codec, "decode", broken)
    fails = check_input(SEEDS[0], memory=False)
    assert [(f.target, f.kind) for f in fails] == [("decode", "exception"), ("inspect", "mismatch")]
    assert "IndexError: tuple index out of range" in fails[0].detail


def test_check_input_reports_excessive_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    # the unfixed decoder: always through the level table
    def with_level_table(raw, shape, numel, bits, scales):  # type: ignore[no-untyped-def]
        return dequantize_packed(raw, shape, bits, scales)

    data = one_tensor((96, 1), bits=8, granularity=Granularity.CHANNEL)
    assert check_input(data) == []
    monkeypatch.setattr(codec, "_dequantize", with_level_table)
    fails = check_input(data)
    assert {(f.target, f.kind) for f in fails} >= {("decode", "memory"), ("aggregate", "memory")}


def test_check_input_reports_wrong_decoded_values(monkeypatch: pytest.MonkeyPatch) -> None:
    real = codec._dequantize

    def too_big(*args):  # type: ignore[no-untyped-def]
        return real(*args) * 2

    monkeypatch.setattr(codec, "_dequantize", too_big)
    fails = check_input(SEEDS[0], memory=False)
    assert fails and fails[0].kind == "oracle"
    assert "exceed their clipping threshold" in fails[0].detail


def test_run_fuzz_reports_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    real = codec.decode

    def sometimes_slow(payload, **kwargs):  # type: ignore[no-untyped-def]
        if len(payload) % 53 == 0:
            time.sleep(0.01)
        return real(payload, **kwargs)

    monkeypatch.setattr(codec, "decode", sometimes_slow)
    report = run_fuzz(1500, seed=1, targets=("decode",), hang_per_byte_s=1e-7)
    hangs = [f for f in report.failures if f.kind == "hang"]
    assert hangs and all(len(f.payload) % 53 == 0 for f in hangs)
    assert not report.ok


def test_command_saves_new_inputs_and_exits_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fuzz.main(["--runs", "3000", "--seed", "4", "--corpus", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fuzz: 3000 inputs" in out and "no failures" in out
    saved = list(tmp_path.glob("*.bin"))
    assert saved and all(len(p.read_bytes()) < MAX_CORPUS_BYTES for p in saved)
    assert all(p.name == corpus_name(p.read_bytes()) for p in saved)
    # a second run replays them first and still passes
    assert fuzz.main(["--runs", "500", "--seed", "5", "--corpus", str(tmp_path)]) == 0, (
        capsys.readouterr().out
    )
    assert fuzz.main(["--runs", "10", "--targets", "decode,nope"]) == 2


# Regressions of three aggregation bugs the fuzzer found (fixed in fl/aggregation.py).


def test_aggregate_returns_arrays_for_0d_tensors() -> None:
    p = encode({"c": np.array(7, np.int64)}, QuantSpec())
    assert check_input(p, strict=True) == []


def test_aggregate_of_int64_extremes_does_not_wrap() -> None:
    p = encode({"n": np.array([2**63 - 1, -(2**63)], np.int64)}, QuantSpec())
    assert check_input(p, strict=True) == []


def test_aggregate_of_huge_mse_claims_has_finite_weights() -> None:
    p = bytearray(SEEDS[0])
    mse = next(f for f in field_offsets(bytes(p)) if f.name == "tensor[0].mse")
    struct.pack_into("<d", p, mse.offset, 1.7e308)  # finite, so decode accepts it
    assert check_input(reseal(p), strict=True) == []
