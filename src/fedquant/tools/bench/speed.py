"""Speed benchmark: throughput as a ratio to memcpy, same run.

The machine this runs on is shared and noisy, so no absolute figure is
trusted on its own: every measurement interleaves the operation with its
reference passes -- ``memcpy`` (``np.copyto`` of the same float32 tensor into
a preallocated buffer) and, for the threshold, one ``abs().sum()`` pass -- rep
by rep, and reports the *median of the per-rep ratios*

    ratio = t_memcpy / t_op

i.e. the operation's input throughput (float32 bytes per second) over the
memcpy bandwidth counted the same way. ``cpu_ratio_memcpy`` is the same
ratio of *process CPU times*: for the 1-thread rows it is what the wall ratio
would be on an idle core, the figure least disturbed by other processes (on a
busy 2-core machine the wall-clock rows mostly measure the neighbours). ``ratio = 0.25`` means encoding a
tensor costs four copies of it. A copy is memory-bound: on the 2-core
machine of ``../shared/PERF-NOTES.md`` one thread already saturates it, so
the same reference serves the 1-thread and all-thread rows.

What is timed (fedquant, CPU, numba kernels)
--------------------------------------------
``kernel(scale=s)``
    the fused quantize + pack kernel alone, into a preallocated output buffer.
``quantize(scale=s)``
    quantize + pack with a given threshold through the public API (the packed
    output is allocated per call: at 8 bits that is a fresh 10 MB buffer, whose
    page faults cost a third of a memcpy of the input).
``threshold``
    the OCTAV threshold alone (one log-linear histogram pass, then the
    fixed-point iteration on the histogram).
``quantize``
    the full client-side quantization: OCTAV threshold, then quantize + pack.
``encode``
    :func:`fedquant.encode` of the tensor: the above plus the wire format
    (record assembly and CRC-32).
``decode``
    :func:`fedquant.decode`: checksum, validation, unpack + dequantize.
``dequantize``
    unpack + level lookup of a :class:`~fedquant.quant.quantizer.QuantizedTensor`
    (allocates the float32 output: a fresh 40 MB buffer at 10M elements).
``kernel(dequantize)``
    the fused unpack + lookup kernel alone, into a preallocated output.

Peers are timed the same way (encode and decode, :mod:`fedquant.tools.bench.peers`).
With ``device="cuda"`` (or any torch device) :func:`torch_speed` times a torch
implementation of the same quantizer and fedquant's ``encode`` of a tensor on that
device (on a GPU, :mod:`fedquant.quant.device` quantizes it there) against
``Tensor.copy_`` on that device.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from fedquant.quant import kernels
from fedquant.quant.clipping import threshold
from fedquant.quant.codec import decode, encode
from fedquant.quant.device import pack_torch
from fedquant.quant.grid import Rounding, noise_coefficient
from fedquant.quant.packing import packed_size
from fedquant.quant.quantizer import _coefficients, dequantize, level_table, quantize
from fedquant.quant.spec import QuantSpec
from fedquant.tools.bench import peers
from fedquant.tools.report import Row

#: the op name of the PyTorch qint8 row of :func:`fedquant_speed`
TORCH_QINT8_OP = "torch quantize_per_tensor (qint8)"
#: the speed goals: (what, op, bits, rounding, ratio at 1 thread, ratio at 2+ threads);
#: bits/rounding None = every width/rounding measured; a ratio None = no goal there
SPEED_GOALS: tuple[tuple[str, str, int | None, str | None, float | None, float | None], ...] = (
    ("full encode", "encode", None, None, 0.25, 0.4),
    ("decode", "decode", None, None, 0.4, 0.4),
    ("raw-float encode", "encode(raw float32)", 32, "", 0.5, 0.5),
)
#: bit widths of the speed table
SPEED_BITS: tuple[int, ...] = (2, 4, 8)
#: peers of the speed table and the bit widths they are timed at
SPEED_PEERS: dict[str, tuple[int, ...]] = {
    "qsgd": (2, 4, 8),
    "qsgd-512": (4,),
    "terngrad": (2,),
    "minmax": (2, 4, 8),
    "rotation": (4,),
    "signsgd": (1,),
    "topk": (4,),
    "torch-qint8": (8,),
}


def measure(
    op: Callable[[], Any],
    refs: Mapping[str, Callable[[], Any]],
    *,
    reps: int = 7,
    sync: Callable[[], None] | None = None,
) -> Row:
    """Median time of ``op`` and the medians of ``t_ref / t_op`` per reference, interleaved.

    Wall-clock and process CPU time are both recorded: on a busy machine a
    single-threaded operation's CPU time is what its wall time would be on an
    idle core, so ``cpu_ratio`` (1-thread rows) is the figure that other
    processes disturb least. One untimed warm-up call of each function comes
    first (numba compilation, page faults of fresh buffers).
    """

    def timed(f: Callable[[], Any]) -> tuple[float, float]:
        if sync is not None:
            sync()
        c0, t0 = time.process_time(), time.perf_counter()
        f()
        if sync is not None:
            sync()
        return time.perf_counter() - t0, time.process_time() - c0

    op()
    for f in refs.values():
        f()
    t_op: list[tuple[float, float]] = []
    t_ref: dict[str, list[tuple[float, float]]] = {k: [] for k in refs}
    for _ in range(max(1, reps)):
        for k, f in refs.items():
            t_ref[k].append(timed(f))
        t_op.append(timed(op))

    def ratios(v: list[tuple[float, float]], i: int) -> float | None:
        rs = [r[i] / o[i] for r, o in zip(v, t_op, strict=True) if o[i] > 0]
        return statistics.median(rs) if rs else None

    return {
        "seconds": statistics.median(t for t, _ in t_op),
        "ref_seconds": {k: statistics.median(t for t, _ in v) for k, v in t_ref.items()},
        "ratio": {k: ratios(v, 0) for k, v in t_ref.items()},
        "cpu_ratio": {k: ratios(v, 1) for k, v in t_ref.items()},
    }


def max_threads() -> int:
    """Threads numba may use (its pool is sized at start-up)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]


class _Threads:
    """Context manager that sets numba's and torch's thread counts, then restores them."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> _Threads:
        import numba
        import torch

        self.saved = (numba.get_num_threads(), torch.get_num_threads())
        numba.set_num_threads(min(self.n, max_threads()))
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc: object) -> None:
        import numba
        import torch

        numba.set_num_threads(self.saved[0])
        torch.set_num_threads(self.saved[1])


def _row(
    op: str, impl: str, bits: int, rnd: str, threads: int, n: int, m: Row, **extra: Any
) -> Row:
    sec = m["seconds"]
    ref = m["ref_seconds"].get("memcpy")
    return {
        "device": extra.pop("device", "cpu"),
        "impl": impl,
        "op": op,
        "bits": bits,
        "rounding": rnd,
        "threads": threads,
        "n": n,
        "seconds": sec,
        "melem_per_s": n / sec / 1e6 if sec > 0 else float("inf"),
        "ratio_memcpy": m["ratio"].get("memcpy"),
        # process CPU time, same ratio: for 1-thread rows, the wall ratio of an idle core
        "cpu_ratio_memcpy": m["cpu_ratio"].get("memcpy"),
        "memcpy_gbps": (8.0 * n / ref / 1e9) if ref else None,
        **{f"x_{k}": sec / v for k, v in m["ref_seconds"].items() if k != "memcpy" and v > 0},
        **extra,
    }


def fedquant_speed(
    *,
    n: int = 10_000_000,
    bits: Sequence[int] = SPEED_BITS,
    roundings: Sequence[str] = ("stochastic", "nearest"),
    threads: Sequence[int] = (1, 0),
    reps: int = 7,
    seed: int = 0,
) -> list[Row]:
    """Rows for fedquant's CPU path; ``threads`` 0 means all (:func:`max_threads`)."""
    import torch

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    dst = np.empty_like(x)
    tx = torch.from_numpy(x)
    x2 = x.reshape(-1, 1000) if n % 1000 == 0 and n >= 1000 else x.reshape(1, -1)

    def memcpy() -> None:
        np.copyto(dst, x)

    key = 1234  # stochastic rounding's seed
    rows: list[Row] = []
    for th in threads:
        nth = th or max_threads()
        with _Threads(nth):
            m = measure(
                lambda: threshold(x, 4, "stochastic"),
                {
                    "memcpy": memcpy,
                    "abs_sum_numpy": lambda: np.abs(x).sum(),
                    "abs_sum_torch": lambda: tx.abs().sum(),
                },
                reps=reps,
            )
            rows.append(_row("threshold", "fedquant", 4, "stochastic", nth, n, m))
            for b in bits:
                for rnd in roundings:
                    s = threshold(x, b, rnd)
                    spec = QuantSpec(default_bits=b, rounding=Rounding(rnd))
                    payload = encode({"w": x2}, spec, seed=key)
                    q = quantize(x, b, scale=s, rounding=rnd, seed=key)
                    inv, step = _coefficients(np.array([s], np.float32), b)
                    step64 = np.array([2.0 * float(np.float32(s)) / ((1 << b) - 1)])
                    out = np.empty(packed_size(n, b), np.uint8)
                    values = np.empty(n, np.float32)
                    ops: dict[str, Callable[[], Any]] = {
                        "kernel(scale=s)": partial(
                            kernels.quantize_pack,
                            x,
                            n,
                            inv,
                            step,
                            step64,
                            b,
                            rnd == "stochastic",
                            np.uint64(key),
                            out,
                        ),
                        "quantize(scale=s)": partial(
                            quantize, x, b, scale=s, rounding=rnd, seed=key
                        ),
                        "quantize": partial(quantize, x, b, rounding=rnd, seed=key),
                        "encode": partial(encode, {"w": x2}, spec, seed=key),
                        "decode": partial(decode, payload),
                        "dequantize": partial(dequantize, q),
                        "kernel(dequantize)": partial(
                            kernels.unpack_dequantize,
                            q.packed,
                            b,
                            n,
                            level_table(q.scales, b),
                            n,
                            values,
                        ),
                    }
                    for name, op in ops.items():
                        m = measure(op, {"memcpy": memcpy}, reps=reps)
                        rows.append(_row(name, "fedquant", b, rnd, nth, n, m))
            # a 1-D tensor travels as raw float32: one copy and a checksum
            raw = encode({"b": x})
            for name, op in (
                ("encode(raw float32)", partial(encode, {"b": x})),
                ("decode(raw float32)", partial(decode, raw)),
            ):
                m = measure(op, {"memcpy": memcpy}, reps=reps)
                rows.append(_row(name, "fedquant", 32, "", nth, n, m))
            # the peer: PyTorch's fused qint8 kernel (nearest, given scale, no clipping search)
            m = measure(partial(torch_qint8_kernel, tx), {"memcpy": memcpy}, reps=reps)
            rows.append(_row(TORCH_QINT8_OP, "torch-qint8", 8, "nearest", nth, n, m))
    return rows


def torch_qint8_kernel(tx: Any) -> Any:
    """``torch.quantize_per_tensor(x, scale, 0, qint8)`` with a fixed scale: PyTorch's
    fused 8-bit nearest quantizer alone (no threshold search), the bar for a plain
    8-bit pass."""
    import warnings

    import torch

    with warnings.catch_warnings():  # deprecated in torch 2.13, still the fused CPU path
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        return torch.quantize_per_tensor(tx, 4.0 / 127.0, 0, torch.qint8)


def naive_torch_stochastic(x: Any, s: float, bits: int) -> Any:
    """The naive torch stochastic quantizer, the baseline the fused kernels replaced:
    clip, scale, add ``torch.rand``, floor, cast -- one temporary per step."""
    import torch

    steps = (1 << bits) - 1
    t = (torch.clamp(x, -s, s) + s) * (steps / (2 * s))
    return torch.floor(t + torch.rand(t.shape)).clamp(0, steps).to(torch.uint8)


def _peer_encode(p: peers.Peer, x: np.ndarray, bits: int, seed: int) -> peers.Encoded:
    return p.encode(x, bits, np.random.default_rng(seed))


def peer_speed(
    *,
    n: int = 10_000_000,
    names: Mapping[str, Sequence[int]] = SPEED_PEERS,
    reps: int = 3,
    seed: int = 0,
    threads: int = 1,
) -> list[Row]:
    """Encode and decode rows for the peers, plus the naive torch quantizer, at ``threads``
    (default 1: the NumPy peers use one thread anyway; 0 means all)."""
    import torch

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    dst = np.empty_like(x)

    def memcpy() -> None:
        np.copyto(dst, x)

    rows: list[Row] = []
    nth = threads or max_threads()
    with _Threads(nth):
        tx = torch.from_numpy(x)
        m = measure(lambda: naive_torch_stochastic(tx, 3.0, 8), {"memcpy": memcpy}, reps=reps)
        rows.append(_row("encode", "naive-torch-stochastic", 8, "stochastic", nth, n, m))
        for name, widths in names.items():
            p = peers.get_peer(name)
            rnd = "stochastic" if p.unbiased else "nearest" if name == "torch-qint8" else ""
            for b in widths:
                enc = p.encode(x, b, np.random.default_rng(seed))
                m = measure(partial(_peer_encode, p, x, b, seed), {"memcpy": memcpy}, reps=reps)
                rows.append(_row("encode", name, b, rnd, nth, n, m))
                m = measure(partial(p.decode, enc), {"memcpy": memcpy}, reps=reps)
                rows.append(_row("decode", name, b, rnd, nth, n, m))
    return rows


# --------------------------------------------------------------------------- torch devices


def torch_quantize_pack(x: Any, s: float, bits: int, stochastic: bool, generator: Any) -> Any:
    """fedquant's quantizer (end levels at ``+-s``) in torch ops, packed LSB-first like
    :mod:`fedquant.quant.packing`; ``bits`` must divide 8. For devices without numba."""
    import torch

    steps = (1 << bits) - 1
    t = x * (steps / (2.0 * s)) + steps / 2.0
    t.clamp_(0.0, float(steps))
    if stochastic:
        t.add_(torch.rand(t.shape, device=t.device, generator=generator)).floor_()
        t.clamp_(max=float(steps))
    else:
        t.add_(0.5).floor_()
    return pack_torch(t.to(torch.uint8).reshape(-1), bits)


def torch_dequantize(packed: Any, s: float, bits: int, n: int) -> Any:
    """Inverse of :func:`torch_quantize_pack`: unpack, then level lookup."""
    import torch

    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    codes = ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]
    steps = (1 << bits) - 1
    lut = torch.linspace(-s, s, steps + 1, device=packed.device, dtype=torch.float32)
    return lut[codes.long()]


def torch_octav(x: Any, c: float, iterations: int = 10) -> float:
    """OCTAV as the paper's reference code runs it: ``iterations`` masked passes from ``mean|x|``."""
    a = x.abs()
    s = a.mean()
    n = a.numel()
    for _ in range(iterations):
        over = a > s
        n_gt = over.sum()
        s = (a * over).sum() / (c * (n - n_gt) + n_gt)
    return float(s)


def torch_speed(
    device: str,
    *,
    n: int = 10_000_000,
    bits: Sequence[int] = SPEED_BITS,
    roundings: Sequence[str] = ("stochastic", "nearest"),
    reps: int = 7,
    seed: int = 0,
) -> list[Row]:
    """The torch implementation on ``device`` (e.g. ``"cuda"``), vs ``Tensor.copy_`` there."""
    import torch

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(n, generator=gen, device=dev)
    dst = torch.empty_like(x)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)

    def memcpy() -> None:
        dst.copy_(x)

    rows: list[Row] = []
    m = measure(
        lambda: torch_octav(x, noise_coefficient(4, "stochastic")),
        {"memcpy": memcpy, "abs_sum_torch": lambda: x.abs().sum()},
        reps=reps,
        sync=sync,
    )
    rows.append(_row("threshold", "torch", 4, "", 0, n, m, device=name))
    for b in bits:
        for rnd in roundings:
            st = rnd == "stochastic"
            s = torch_octav(x, noise_coefficient(b, rnd))
            m = measure(
                partial(torch_quantize_pack, x, s, b, st, gen),
                {"memcpy": memcpy},
                reps=reps,
                sync=sync,
            )
            rows.append(_row("quantize(scale=s)", "torch", b, rnd, 0, n, m, device=name))
            packed = torch_quantize_pack(x, s, b, st, gen)
            m = measure(
                partial(torch_dequantize, packed, s, b, n),
                {"memcpy": memcpy},
                reps=reps,
                sync=sync,
            )
            rows.append(_row("dequantize", "torch", b, rnd, 0, n, m, device=name))
            # fedquant's own encode of a tensor on the device: on a GPU it takes the
            # device path (fedquant.quant.device), only codes and scales cross
            spec = QuantSpec(default_bits=b, rounding=Rounding(rnd))
            m = measure(
                partial(encode, {"w": x.reshape(1, -1)}, spec, seed=1234),
                {"memcpy": memcpy},
                reps=reps,
                sync=sync,
            )
            rows.append(_row("encode", "fedquant", b, rnd, 0, n, m, device=name))
    return rows


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every speed table: those of
    :func:`fedquant.tools.report.environment` and numba's threads and threading layer."""
    import numba

    from fedquant.tools import report

    return report.environment(("numpy", "numba", "torch")) | {
        "numba_threads": max_threads(),
        "numba_threading_layer": str(numba.config.THREADING_LAYER),  # type: ignore[attr-defined]
    }
