"""The device path (torch ops): checked on CPU tensors, and on CUDA where there is one."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from fedquant.errors import NonFiniteError
from fedquant.quant import codec, device, kernels
from fedquant.quant.clipping import ThresholdMethod, _threshold_flat
from fedquant.quant.grid import Rounding
from fedquant.quant.quantizer import dequantize_packed, level_table, quantize_rows
from fedquant.quant.spec import QuantSpec

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_stream_equals_the_kernels_stream() -> None:
    for key in (0, 12345, 2**64 - 1, 0x9E3779B97F4A7C15):
        n = 10_003
        got = device.uniforms(key, n, "cpu").numpy()
        assert np.array_equal(got, kernels.uniform_reference(key, np.arange(n))), key


def test_histograms_equal_the_kernels_histogram() -> None:
    x = np.random.default_rng(0).standard_cauchy((3, 50_000)).astype(np.float32)
    x[1, :10] = 0.0
    hist = device.abs_histograms(torch.from_numpy(x))
    cnt, s1 = hist.counts, hist.sums
    for r in range(3):
        c, s, bad = kernels.abs_histogram(np.ascontiguousarray(x[r]))
        assert bad == 0 and np.array_equal(cnt[r, : kernels.HIST_BINS], c)
        np.testing.assert_allclose(s1[r, : kernels.HIST_BINS], s, rtol=1e-12)


@pytest.mark.parametrize("method", [ThresholdMethod.OCTAV, ThresholdMethod.OCTAV_PAPER])
@pytest.mark.parametrize("m", [1000, 100_000])  # the exact path and the histogram path
def test_thresholds_equal_the_cpu_path(m: int, method: ThresholdMethod) -> None:
    rng = np.random.default_rng(m)
    x = np.stack([rng.standard_normal(m), rng.laplace(size=m), rng.standard_t(3, m)])
    x = x.astype(np.float32)
    for bits in (2, 4, 8):
        for rnd in Rounding:
            got = device.octav_thresholds(torch.from_numpy(x), bits, rnd, method, "t")
            want = [_threshold_flat(x[r], bits, rnd, method, 99.99) for r in range(3)]
            # the per-bin sums are added in another order: equal to float32 rounding
            np.testing.assert_allclose(got, want, rtol=2e-7)


def test_non_finite_input_is_refused() -> None:
    for m in (100, 100_000):
        x = torch.zeros(2, m)
        x[1, 5] = float("nan")
        with pytest.raises(NonFiniteError, match=r"t: input holds 1 NaN/Inf"):
            device.octav_thresholds(x, 4, Rounding.NEAREST, ThresholdMethod.OCTAV, "t")


@pytest.mark.parametrize("rounding", list(Rounding))
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codes_equal_the_kernels_codes(bits: int, rounding: Rounding) -> None:
    x = np.random.default_rng(bits).standard_normal((4, 25_001)).astype(np.float32)
    scales = np.array([1.9, 2.5, 0.7, 3.1], np.float32)
    key = 987654321
    q = device.quantize_on_device(torch.from_numpy(x), scales, bits, rounding, key)
    ref = quantize_rows(x, scales, bits, rounding, np.uint64(key))
    got = dequantize_packed(q.packed, x.shape, bits, scales)
    want = dequantize_packed(ref.packed, x.shape, bits, scales)
    # float32 rounding of the grid position (fused multiply-add or not) may put a rare
    # value on the other side of a rounding boundary: then one step apart
    same = got == want
    assert same.mean() > 0.9999
    step = 2 * scales.astype(np.float64).reshape(-1, 1) / ((1 << bits) - 1)
    assert np.all(np.abs(got - want) <= np.broadcast_to(step, x.shape) * 1.0001)
    assert q.mse == pytest.approx(ref.sq_err / x.size, rel=1e-4)


@pytest.mark.parametrize("bits", range(1, 9))
def test_values_on_the_grid_are_exact_on_the_device_path(bits: int) -> None:
    scales = np.array([0.75, 123.456], np.float32)
    lv = level_table(scales, bits)
    x = np.stack([np.tile(r, max(4, 20_000 >> bits)) for r in lv]).astype(np.float32)
    for rnd in Rounding:
        q = device.quantize_on_device(torch.from_numpy(x), scales, bits, rnd, 5)
        assert np.array_equal(dequantize_packed(q.packed, x.shape, bits, scales), x), rnd


def _on_device_anyway(t: object) -> bool:
    return hasattr(t, "detach")  # CPU tensors take the device path too, for the test


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_encode_takes_the_device_path_and_agrees_with_the_cpu(
    rounding: str, granularity: str
) -> None:
    rng = np.random.default_rng(1)
    t = {
        "w": torch.from_numpy(rng.standard_normal((64, 800)).astype(np.float32)),
        "b": torch.from_numpy(rng.standard_normal(64).astype(np.float32)),
        "n": torch.tensor(3),
    }
    spec = QuantSpec(default_bits=4, rounding=rounding, granularity=granularity)
    cpu = codec.decode(codec.encode(t, spec, seed=3))
    with mock.patch.object(device, "is_device_tensor", _on_device_anyway):
        calls = mock.Mock(wraps=device.quantize_on_device)
        with mock.patch.object(device, "quantize_on_device", calls):
            res = codec.encode_with_stats(t, spec, seed=3)
    assert calls.call_count == 1  # "w" only: "b" travels raw, "n" is an integer
    dev = codec.decode(res.payload)
    np.testing.assert_allclose(dev.info["w"].scales, cpu.info["w"].scales, rtol=2e-7)
    assert (dev.tensors["w"] == cpu.tensors["w"]).mean() > 0.999
    assert np.array_equal(dev.tensors["b"], cpu.tensors["b"])
    assert dev.tensors["n"] == 3 and res.tensors["w"].mse == pytest.approx(
        cpu.info["w"].mse, rel=1e-3
    )


def test_plans_the_device_cannot_run_copy_to_the_host() -> None:
    t = {"w": torch.randn(64, 600, generator=torch.Generator().manual_seed(0))}
    for spec in (
        QuantSpec(default_bits=4, method="max"),
        QuantSpec(default_bits=4, entropy="rans"),
    ):
        assert not codec.device_plan(spec.resolve({"w": ((64, 600), True)})["w"])
        with mock.patch.object(device, "is_device_tensor", _on_device_anyway):
            with mock.patch.object(device, "quantize_on_device") as q:
                p = codec.encode(t, spec, seed=1)
        q.assert_not_called()
        assert np.array_equal(
            codec.decode(p).tensors["w"], codec.decode(codec.encode(t, spec, seed=1)).tensors["w"]
        )


@CUDA
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cuda_tensors_are_quantized_on_the_gpu(rounding: str) -> None:
    x = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(default_bits=4, rounding=rounding)
    cpu = codec.decode(codec.encode({"w": x}, spec, seed=3))
    with mock.patch.object(device, "quantize_on_device", wraps=device.quantize_on_device) as q:
        gpu = codec.decode(codec.encode({"w": x.cuda()}, spec, seed=3))
    q.assert_called_once()
    np.testing.assert_allclose(gpu.info["w"].scales, cpu.info["w"].scales, rtol=2e-7)
    assert (gpu.tensors["w"] == cpu.tensors["w"]).mean() > 0.999
