"""Batched client training vs the loop: one round's local training, timed.

:func:`batched_speedup` builds the run of a :class:`~fedquant.fl.config.RunConfig`
(default: the ``fedquant run`` default job -- 10 clients, embedded MNIST, the
paper's CNN, batch 64, 1 epoch), then times the local training of round 1's
clients from the initial global model

* ``loop``: one after another, :func:`fedquant.fl.client.train_local` (what
  ``batched_clients=0`` does), and
* ``batched-K``: K at a time, :func:`fedquant.fl.batched.train_batched` (what
  ``batched_clients=K`` does),

interleaved rep by rep (the order rotates every rep) after one untimed warm-up
pass of each, so a neighbour's load falls on all variants alike. Reported per
variant: the median wall and process-CPU seconds; and per batched variant the
speed-up, the *median of the per-rep ratios* ``t_loop / t_batched`` (> 1:
batched is faster), plus the largest difference of its trained weights from
the loop's (float round-off, see :mod:`fedquant.fl.batched`). Encoding,
aggregation and evaluation are not timed: they do not change with batching.

Command: ``python -m fedquant.tools.bench.batched [--reps 7] [--ks 10,5] [--threads N]``.

The measured figures and why batching can lose on a CPU are in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedquant.errors import ConfigError
from fedquant.fl import seeding
from fedquant.fl.client import load_numpy_state, state_numpy, train_local
from fedquant.fl.config import RunConfig
from fedquant.fl.data import Dataset
from fedquant.fl.seeding import Purpose
from fedquant.fl.simulation import Simulation
from fedquant.tools.report import Row

__all__ = ["batched_speedup", "main"]


def _timed(fn: Callable[[], dict[int, dict[str, np.ndarray]]]) -> tuple[float, float, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def batched_speedup(
    cfg: RunConfig | None = None,
    *,
    ks: Sequence[int] = (10, 5),
    reps: int = 7,
    threads: int | None = None,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Time one round's local training: the loop vs ``train_batched`` K clients at a time.

    Parameters
    ----------
    cfg : RunConfig, optional
        The run (default ``RunConfig()``, the default job). Its ``batched_clients``
        is ignored; ``qat`` must be off (QAT is not batched).
    ks : sequence of int, default (10, 5)
        The K values timed (each >= 1).
    reps : int, default 7
        Timed repetitions per variant (after one warm-up pass each).
    threads : int, optional
        ``torch.set_num_threads`` for the measurement (default: torch's default).
    dataset : Dataset, optional
        Instead of loading ``cfg.dataset`` (the smoke test passes a small one).

    Returns
    -------
    dict
        ``{"config": {...}, "clients", "examples", "threads", "reps", "rows": [...]}``;
        one row per variant with ``variant``, ``k``, ``median_s``, ``median_cpu_s``,
        ``all_s`` and, for batched rows, ``speedup`` (median per-rep ``t_loop /
        t_batched``) and ``max_abs_diff`` (vs the loop's trained states).

    Raises
    ------
    ConfigError
        For ``reps < 1``, a K < 1, or ``cfg.qat``.
    """
    cfg = cfg if cfg is not None else RunConfig()
    if reps < 1:
        raise ConfigError("reps", f"{reps!r} is out of range; expected an integer >= 1")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigError("ks", f"{list(ks)!r} is not valid; expected integers >= 1")
    if cfg.qat:
        raise ConfigError("qat", "quantization-aware training is not batched; expected --no-qat")
    if threads:
        torch.set_num_threads(threads)
    sim = Simulation(cfg.with_(batched_clients=0), dataset=dataset)
    round_ = 1
    clients = [int(c) for c in sim.sample_clients(round_)]
    start = sim.new_state().global_state  # a copy: initial_state shares the model's memory

    def loop() -> dict[int, dict[str, np.ndarray]]:
        out = {}
        for c in clients:
            load_numpy_state(sim.model, start)
            x, y = sim._client_data(c)
            train_local(
                sim.model,
                TensorDataset(x, y),
                sim.task,
                sim.train_cfg,
                seeding.torch_generator(cfg.seed, Purpose.SHUFFLE, round_, c),
            )
            out[c] = {k: v.copy() for k, v in state_numpy(sim.model).items()}  # not a view
        return out

    def batched(k: int) -> Callable[[], dict[int, dict[str, np.ndarray]]]:
        def run() -> dict[int, dict[str, np.ndarray]]:
            out = {}
            for i in range(0, len(clients), k):
                for c, trained in sim.train_clients(clients[i : i + k], start, round_).items():
                    out[c] = trained.state
            return out

        return run

    variants: list[tuple[str, int, Callable[[], dict[int, dict[str, np.ndarray]]]]] = [
        ("loop", 0, loop),
        *((f"batched-{k}", k, batched(k)) for k in ks),
    ]
    wall: dict[str, list[float]] = {v[0]: [] for v in variants}
    cpu: dict[str, list[float]] = {v[0]: [] for v in variants}
    diff: dict[str, float] = {}
    states: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for name, _, fn in variants:  # warm-up (vmap's first call traces) and the states
        states[name] = fn()
    for name in wall:
        diff[name] = max(
            float(np.max(np.abs(got[key].astype(np.float64) - ref.astype(np.float64))))
            for c, got in states[name].items()
            for key, ref in states["loop"][c].items()
        )
    for rep in range(reps):
        shift = rep % len(variants)
        for name, _, fn in variants[shift:] + variants[:shift]:
            w, c, _ = _timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    rows: list[Row] = []
    for name, k, _ in variants:
        row: Row = {
            "variant": name,
            "k": k,
            "median_s": statistics.median(wall[name]),
            "median_cpu_s": statistics.median(cpu[name]),
            "all_s": wall[name],
        }
        if k:
            row["speedup"] = statistics.median(
                lw / bw for lw, bw in zip(wall["loop"], wall[name], strict=True)
            )
            row["cpu_speedup"] = statistics.median(
                lc / bc for lc, bc in zip(cpu["loop"], cpu[name], strict=True)
            )
            row["max_abs_diff"] = diff[name]
        rows.append(row)
    return {
        "config": {
            k: getattr(cfg, k)
            for k in ("dataset", "num_clients", "model", "batch_size", "epochs", "seed")
        },
        "clients": len(clients),
        "examples": int(sum(len(sim.parts[c]) for c in clients)),
        "threads": torch.get_num_threads(),
        "reps": reps,
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as a small plain-text table."""
    lines = [
        f"{result['clients']} clients, {result['examples']} examples, "
        f"{result['threads']} torch threads, median of {result['reps']} interleaved reps",
        f"{'variant':<12} {'wall s':>8} {'cpu s':>8} {'speed-up':>9} {'cpu speed-up':>13} {'max |diff|':>11}",
    ]
    for r in result["rows"]:
        extra = (
            f"{r['speedup']:>8.2f}x {r['cpu_speedup']:>12.2f}x {r['max_abs_diff']:>11.2e}"
            if r["k"]
            else f"{'1.00x':>9} {'1.00x':>13} {'-':>11}"
        )
        lines.append(f"{r['variant']:<12} {r['median_s']:>8.3f} {r['median_cpu_s']:>8.3f} {extra}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedquant.tools.bench.batched",
        description="Time one round's local training of the default run: loop vs batched clients.",
    )
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per variant (default 7)")
    p.add_argument("--ks", default="10,5", help="comma-separated K values (default 10,5)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", help="also write the result to this JSON file")
    args = p.parse_args(argv)
    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        print(f"--ks: {args.ks!r} is not valid; expected integers like 10,5", file=sys.stderr)
        return 2
    try:
        result = batched_speedup(ks=ks, reps=args.reps, threads=args.threads or None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
