"""The public entry points: defaults, seeds, argument checks, bit strings, plans, round trips."""

from __future__ import annotations

import doctest
import importlib
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fedquant
from fedquant.errors import ConfigError, FedquantError, InvalidInputError
from fedquant.quant.codec import DTYPES, decode, describe_payload, encode, encode_with_stats
from fedquant.quant.plan import UpdatePlan
from fedquant.quant.spec import QuantSpec, parse_layer_bits
from tests.quant.test_codec import small_update


@pytest.mark.parametrize(
    "module",
    [
        "fedquant.quant.spec",
        "fedquant.quant.codec",
        "fedquant.fl.aggregation",
        "fedquant.quant.plan",
    ],
)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0


# ------------------------------------------------------------------ the smallest records


NUMPY_DTYPES = [name for name, _ in DTYPES.values() if name != "bfloat16"]


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_a_payload_of_one_0d_tensor_decodes(dtype: str) -> None:
    x = np.array(1, dtype=dtype)
    dec = decode(encode({"a": x}, seed=0))
    assert dec.tensors["a"].shape == ()
    assert dec.tensors["a"] == 1


def test_the_smallest_record_the_encoder_writes_decodes_in_bulk() -> None:
    # 32-byte records only (the minimum): the decoder's count check must admit them
    upd = {chr(ord("a") + i): np.array(i % 2, np.bool_) for i in range(20)}
    payload = encode(upd)
    dec = decode(payload)
    assert list(dec.tensors) == list(upd)
    assert all(info.nbytes == 32 for info in dec.info.values())
    assert [bool(v) for v in dec.tensors.values()] == [bool(v) for v in upd.values()]


# ------------------------------------------------------------------ property: round trips

_FLOAT_LIMIT = {"float16": 6e4, "float32": 1e6, "float64": 1e6}


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(
        st.lists(
            st.from_regex(r"[a-z][a-z0-9_.]{0,6}", fullmatch=True),
            min_size=1,
            max_size=5,
            unique=True,
        )
    )
    out = {}
    for name in names:
        dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))  # () is 0-d
        if dtype.kind == "f":
            lim = _FLOAT_LIMIT[dtype.name]
            elements = st.floats(-lim, lim, width=8 * min(dtype.itemsize, 4))
        elif dtype.kind == "b":
            elements = st.booleans()
        else:
            info = np.iinfo(dtype)
            elements = st.integers(int(info.min), int(info.max))
        out[name] = draw(hnp.arrays(dtype, shape, elements=elements))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    upd=state_dicts(),
    bits=st.sampled_from([1, 2, 3, 4, 8, 32]),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    granularity=st.sampled_from(["tensor", "channel"]),
    method=st.sampled_from(["octav", "max"]),
    entropy=st.sampled_from(["none", "rans"]),
    seed=st.one_of(
        st.none(), st.integers(0, 2**64), st.tuples(st.integers(0, 99), st.integers(0, 99))
    ),
)
def test_round_trip_of_any_small_state_dict(
    upd: dict[str, np.ndarray],
    bits: int,
    rounding: str,
    granularity: str,
    method: str,
    entropy: str,
    seed: object,
) -> None:
    spec = QuantSpec(
        default_bits=bits,
        rounding=rounding,
        granularity=granularity,
        method=method,
        entropy=entropy,
    )
    res = encode_with_stats(upd, spec, seed=seed)  # type: ignore[arg-type]
    dec = decode(res.payload)
    assert list(dec.tensors) == list(upd)
    assert dec.nbytes == len(res.payload)
    for name, x in upd.items():
        got, info = dec.tensors[name], dec.info[name]
        assert got.shape == x.shape and info.dtype == x.dtype.name
        if x.dtype.kind in "biu":  # integers and booleans travel exactly
            assert got.dtype == x.dtype and np.array_equal(got, x)
            continue
        assert got.dtype == np.float32
        x32 = x.astype(np.float32)
        if not info.quantized:
            assert np.array_equal(got, x32)
            continue
        # each value lies within one step of the grid, past the clip only by its own excess:
        # |x - q| <= max(|x| - s, 0) + step (stochastic; half a step for nearest)
        rows = x32.reshape(info.scales.size, -1)  # one row per scale
        s = info.scales.astype(np.float64).reshape(-1, 1)
        step = 2.0 * s / ((1 << info.bits) - 1)
        reach = step if rounding == "stochastic" else step / 2
        err = np.abs(rows.astype(np.float64) - got.reshape(rows.shape))
        excess = np.maximum(np.abs(rows) - s, 0.0)
        # float32 arithmetic on values up to 1e6: 1e-6 relative slack (a few float32 ulps)
        slack = 1e-6 * np.maximum(np.abs(rows), s) + 1e-30
        assert (err <= excess + reach + slack).all(), name
        assert np.isfinite(info.mse) and info.mse >= 0


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool, torch.uint8]
)
def test_to_torch_restores_every_dtype_the_codec_accepts(dtype: torch.dtype) -> None:
    t = (torch.arange(6).reshape(2, 3) % 2).to(dtype)
    scalar = torch.tensor(1).to(dtype)
    dec = decode(encode({"t": t, "s": scalar}, QuantSpec(default_bits=32), seed=0))
    back = dec.to_torch()
    assert back["t"].dtype == dtype and torch.equal(back["t"], t)
    assert back["s"].dtype == dtype and back["s"].shape == () and torch.equal(back["s"], scalar)
    if dtype.is_floating_point:  # quantized, then back in the dtype it was sent in
        w = torch.linspace(-1, 1, 12).reshape(3, 4).to(dtype)
        back = decode(encode({"w": w}, QuantSpec(default_bits=4), seed=0)).to_torch()
        assert back["w"].dtype == dtype and back["w"].shape == (3, 4)
        # a 4-bit grid over at most [-1, 1]: within one step (2/15) of w, plus the dtype's
        # own rounding of the result (bfloat16's spacing near 1 is 2**-7 < 1e-2)
        assert float((back["w"].float() - w.float()).abs().max()) <= 2 / 15 + 1e-2


# ------------------------------------------------------------------ defaults and seeds


def test_encode_works_with_defaults_and_fresh_entropy() -> None:
    upd = small_update()
    a, b = encode(upd), encode(upd)  # stochastic rounding, no seed: OS entropy each call
    assert a != b
    assert decode(a).info["fc.weight"].bits == 8 == decode(b).info["fc.weight"].bits
    # nearest rounding needs no randomness: the same bytes every call
    spec = QuantSpec(rounding="nearest")
    assert encode(upd, spec) == encode(upd, spec)


def test_tuple_seeds_are_seed_sequences() -> None:
    upd = small_update()
    assert encode(upd, seed=(3, 7)) == encode(upd, seed=np.random.SeedSequence([3, 7]))
    assert encode(upd, seed=(3, 7)) != encode(upd, seed=(7, 3))
    assert encode(upd, seed=[3, 7]) == encode(upd, seed=(3, 7))
    for bad in [(), (1, -2), (1, 2.5), (True, 1), ("a",)]:
        with pytest.raises(InvalidInputError, match=r"a tuple seed must hold non-negative ints"):
            encode(upd, seed=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"seed='x' is not usable"):
        encode(upd, seed="x")  # type: ignore[arg-type]


# ------------------------------------------------------------------ bad arguments


def test_bad_encode_arguments_are_fedquant_errors() -> None:
    x = np.ones((3, 3), np.float32)
    with pytest.raises(InvalidInputError, match=r"tensors is a list; expected a mapping"):
        encode([x])  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"pass model.state_dict\(\), not the model"):
        encode(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"spec='4' is not a QuantSpec.*from_strings"):
        encode({"x": x}, "4")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"meta is a list; expected a mapping"):
        encode({"x": x}, meta=[("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"tensor 'x' is not an array"):
        encode({"x": [[1.0, 2.0], [3.0]]})
    with pytest.raises(InvalidInputError, match=r"tensor name '\\ud800' must be a str"):
        encode({"\ud800": x})
    with pytest.raises(InvalidInputError, match=r"has dtype object"):
        encode({"x": None})


def test_torch_tensors_without_dense_values_are_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"tensor 'w' is on the meta device"):
        encode({"w": torch.empty(3, 3, device="meta")})
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(
        InvalidInputError, match=r"tensor 'w' has layout torch.sparse_coo.*to_dense"
    ):
        encode({"w": sparse})
    with warnings.catch_warnings():  # quantized tensors are deprecated in recent torch
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    with pytest.raises(InvalidInputError, match=r"tensor 'q' has dtype qint8; supported"):
        encode({"q": q})
    with pytest.raises(InvalidInputError, match=r"tensor 'c' has dtype complex64"):
        encode({"c": torch.zeros(2, dtype=torch.complex64)})


def test_bad_spec_arguments_are_config_errors() -> None:
    assert QuantSpec(rules={"fc.*": 4}).rules == (("fc.*", 4),)
    assert QuantSpec(rules="fc.*=4").rules == (("fc.*", 4),)
    assert QuantSpec(layer_bits="4-2").layer_bits == (4, 2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"rules: 'fc' in \['fc'\] is not a rule; expected"):
        QuantSpec(rules=["fc"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"rules: 3 is not valid; expected \(pattern, bits\)"):
        QuantSpec(rules=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"rules: rules=9 is not a supported bit width"):
        QuantSpec(rules={"fc.*": 9})
    with pytest.raises(ConfigError, match=r"bits: layer_bits=4 is not a sequence of widths"):
        QuantSpec(layer_bits=4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"percentile: 'x' is not a number in \(0, 100\]"):
        QuantSpec(percentile="x")  # type: ignore[arg-type]


def test_a_rule_that_matches_no_tensor_names_the_tensors() -> None:
    upd = small_update()
    with pytest.raises(
        ConfigError,
        match=r"rules: pattern '0\.\*' matches no floating-point tensor .*the model's are: "
        r"conv.weight, conv.bias, fc.weight$",
    ):
        encode(upd, QuantSpec(rules={"0.*": 8}))
    with pytest.raises(ConfigError, match=r"pattern 'bn.num_batches_tracked' matches no floating"):
        encode(upd, QuantSpec(rules={"bn.num_batches_tracked": 8}))
    with pytest.raises(
        ConfigError,
        match=r"'fc.weight=4' never applies: every tensor it matches \(fc.weight\) is taken by "
        r"an earlier rule",
    ):
        encode(upd, QuantSpec(rules=(("fc.*", 8), ("fc.weight", 4))))
    # a rule that reaches at least one tensor of its own is fine
    dec = decode(encode(upd, QuantSpec(rules=(("fc.*", 8), ("*.weight", 2))), seed=0))
    assert dec.info["fc.weight"].bits == 8 and dec.info["conv.weight"].bits == 2


# ------------------------------------------------------------------ bit strings


@pytest.mark.parametrize(
    "text", ["-4", "4--2-2-4", "4-2-2-4-", "4 - 2", "\u0663", "4,,2", "+4", "4_0"]
)
def test_malformed_bit_strings_are_refused(text: str) -> None:
    expected = rf"bits: {text!r} is not valid; expected .* ASCII digits .* e\.g\. '8' or '4-2-2-4'"
    with pytest.raises(ConfigError, match=expected.replace("+", r"\+")):
        QuantSpec.from_strings(bits=text)


def test_well_formed_bit_strings() -> None:
    assert parse_layer_bits("4-2-2-4") == (4, 2, 2, 4)
    assert parse_layer_bits("4,2,2,4") == (4, 2, 2, 4)
    assert parse_layer_bits(" 8 ") == (8,)
    assert QuantSpec.from_strings("32").default_bits == 32
    with pytest.raises(ConfigError, match=r"bits: bits=9 is not a supported bit width"):
        parse_layer_bits("4-9")


@pytest.mark.parametrize("rules", ["fc=\u0668", "fc=+8", "fc=8.0"])
def test_malformed_rule_widths_are_refused(rules: str) -> None:
    with pytest.raises(ConfigError, match=r"rules: .* is not an integer in ASCII digits"):
        QuantSpec.from_strings(bits="8", rules=rules)


@pytest.mark.parametrize("text", ["auto:\u0662", "auto: 2", "auto:2e0", "auto:1_5"])
def test_malformed_budgets_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"is not a bit budget; expected 'auto:BITS'"):
        QuantSpec.from_strings(bits=text)


def test_cli_refuses_a_negative_bit_width(capsys: pytest.CaptureFixture[str]) -> None:
    from fedquant.cli import main

    assert main(["run", "--bits", "-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bits: '-4' is not valid; expected" in err[0]


# ------------------------------------------------------------------ plans


def test_plan_lists_every_tensor_with_its_bits_and_exact_bytes() -> None:
    upd = small_update()
    spec = QuantSpec.from_strings("4-2", rules="conv.bias=8")
    plan = spec.plan(upd)
    assert isinstance(plan, UpdatePlan)
    res = encode_with_stats(upd, spec, seed=0)
    assert plan.nbytes == len(res.payload)
    assert [(r.name, r.shape, r.bits, r.nbytes) for r in plan.rows] == [
        (i.name, i.shape, i.bits, i.nbytes) for i in res.tensors.values()
    ]
    assert [r.bits for r in plan.rows] == [4, 8, 2, 64]
    text = str(plan).splitlines()
    assert text[0].split() == ["tensor", "shape", "sent", "as", "bytes"]
    assert text[1].split() == ["conv.weight", "4x3x3x3", "4", "bits", str(plan.rows[0].nbytes)]
    assert text[4].split()[:3] == ["bn.num_batches_tracked", "()", "int64"]
    assert text[-1].startswith(f"payload: {plan.nbytes:,} bytes")
    # a budget is allocated from the values, as encode does
    auto = QuantSpec.from_strings("auto:3").plan(upd)
    assert [r.bits for r in auto.rows if r.quantized] == [
        i.bits
        for i in encode_with_stats(upd, QuantSpec.from_strings("auto:3"), seed=0).tensors.values()
        if i.quantized
    ]


def test_run_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    from fedquant.cli import _print_plan

    _print_plan(QuantSpec.from_strings("4-2"), small_update())
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "uplink per client and round, bits 4-2:"
    assert out[2].split()[:4] == ["conv.weight", "4x3x3x3", "4", "bits"]


# ------------------------------------------------------------------ aggregate


def test_library_round_trip_with_a_torch_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(144, 3),
    )
    p = fedquant.encode(model.state_dict())
    result = fedquant.aggregate([p, p])
    state = result.to_torch()
    assert model.load_state_dict(state) is not None  # strict: every key matched
    assert state["1.num_batches_tracked"].dtype == torch.int64
    # two identical payloads average to their own decoded values
    dec = fedquant.decode(p)
    for name, v in dec.tensors.items():
        np.testing.assert_array_equal(result.tensors[name], v)
    model.load_state_dict(dec.to_torch())


def _payloads(counts: list[int]) -> tuple[list[bytes], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(1)
    ups = [{"w": rng.standard_normal((3, 4)).astype(np.float32)} for _ in counts]
    spec = QuantSpec(default_bits=32)  # raw float32: the average is checkable exactly
    return [
        encode(u, spec, meta={"num_examples": n}) for u, n in zip(ups, counts, strict=True)
    ], ups


def test_fedavg_reads_num_examples_from_the_payloads() -> None:
    payloads, ups = _payloads([10, 30, 60])
    res = fedquant.aggregate(payloads, rule="fedavg")
    want = np.average(np.stack([u["w"] for u in ups]), axis=0, weights=[10, 30, 60])
    np.testing.assert_allclose(res.tensors["w"], want, rtol=1e-6)  # float32 result of a float64 sum
    # given explicitly, they override the metadata
    res = fedquant.aggregate(payloads, rule="fedavg", num_examples=[1, 1, 2])
    assert res.weights["w"].tolist() == [0.25, 0.25, 0.5]
    capped = fedquant.aggregate(payloads, rule="fedavg", max_weight=0.4)
    assert capped.weights["w"].max() == pytest.approx(0.4)


def test_bad_aggregate_arguments() -> None:
    payloads, _ = _payloads([10, 30])
    bare = encode({"w": np.ones((3, 4), np.float32)}, QuantSpec(default_bits=32))
    with pytest.raises(
        InvalidInputError,
        match=r"fedavg needs each client's number of examples, but payload #1 has "
        r"num_examples=None .* pass num_examples=",
    ):
        fedquant.aggregate([payloads[0], bare], rule="fedavg")
    with pytest.raises(InvalidInputError, match=r"payloads is a single payload; expected a list"):
        fedquant.aggregate(payloads[0])
    with pytest.raises(InvalidInputError, match=r"payload #1 is a str; expected bytes"):
        fedquant.aggregate([payloads[0], "x"])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match=r"payloads is a int; expected a list"):
        fedquant.aggregate(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"no client payloads"):
        fedquant.aggregate([])
    with pytest.raises(ConfigError, match=r"aggregation: 'best' is unknown; expected one of"):
        fedquant.aggregate(payloads, rule="best")
    with pytest.raises(
        InvalidInputError, match=r"max_weight=0 is not valid; expected a number in \(0, 1\]"
    ):
        fedquant.aggregate(payloads, max_weight=0)
    with pytest.raises(
        InvalidInputError, match=r"num_examples=\[1\] is not valid; expected one int"
    ):
        fedquant.aggregate(payloads, rule="fedavg", num_examples=[1])
    with pytest.raises(
        InvalidInputError, match=r"num_examples weights clients under rule='fedavg' only"
    ):
        fedquant.aggregate(payloads, num_examples=[1, 2])
    with pytest.raises(
        InvalidInputError, match=r"came from describe_payload\(\)\); use decode\(\)"
    ):
        describe_payload(payloads[0]).to_torch()
    assert issubclass(InvalidInputError, FedquantError)


def test_more_bad_arguments_found_by_trying() -> None:
    with pytest.raises(InvalidInputError, match=r"tensor 'x' holds float64 values up to 1e\+300"):
        encode({"x": np.full((2, 2), 1e300)})
    with pytest.raises(ConfigError, match=r"spec: unknown option\(s\) foo; expected some of"):
        QuantSpec.from_strings(bits="8", foo=1)
    with pytest.raises(ConfigError, match=r"spec: unknown option\(s\) bitz"):
        QuantSpec().with_(bitz=4)
    with pytest.raises(InvalidInputError, match=r"dequantize: expected the QuantizedTensor"):
        fedquant.dequantize(np.ones(3))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"threshold: x is not an array of numbers"):
        fedquant.threshold("a", 2)
    payloads, _ = _payloads([10])
    with pytest.raises(InvalidInputError, match=r"num_examples=3 is not valid"):
        fedquant.aggregate(payloads, rule="fedavg", num_examples=3)  # type: ignore[arg-type]


def test_big_endian_arrays_travel_as_their_values() -> None:
    x = np.arange(12, dtype=">f4").reshape(3, 4)
    i = np.arange(5, dtype=">i8")
    dec = decode(encode({"x": x, "i": i}, QuantSpec(default_bits=32)))
    np.testing.assert_array_equal(dec.tensors["x"], x)
    np.testing.assert_array_equal(dec.tensors["i"], i)
    assert dec.info["x"].dtype == "float32" and dec.info["i"].dtype == "int64"
