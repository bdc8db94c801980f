"""Federated benchmarks: traffic to a target accuracy, the simulator's overhead and memory.

Every function runs the real simulator (:class:`fedquant.fl.simulation.Simulation`) and returns
plain rows (dicts), like the rest of :mod:`fedquant.tools.bench`; the command is
``python -m fedquant.tools.bench --only federated``.

:func:`bytes_to_target`
    Uplink bytes each method needs to reach a target test accuracy: float32
    FedAvg's accuracy (the mean of its last ``k`` evaluated rounds, averaged
    over seeds) minus one point. Bytes are the simulator's
    ``cum_uplink_bytes``: the summed lengths of the encoded payloads the
    server received, up to and including the first round whose accuracy
    reaches the target.
:func:`overhead`
    The default run's (``RunConfig()``) time per round split into local
    training, evaluation and everything else (encode, admission, aggregation,
    broadcast, loading the model, bookkeeping), measured by wrapping the
    simulator's functions with timers in the same run; training samples per
    second; the resident set size after every round and its slope.
:func:`memory_vs_clients`
    The resident set size of fresh processes that simulate the same data
    split among more and more clients: a model copy per client would add
    ``clients x`` the model's float32 size.

The comparison with Flower's simulation engine is in
:mod:`fedquant.tools.bench.flower_ray`, which imports this module and
:mod:`fedquant.flower`. Timings are wall-clock on a possibly busy
machine: every timed row records the load average, and the figures worth
quoting are the ratios measured within one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.errors import ConfigError, FedquantError
from fedquant.fl.config import RunConfig
from fedquant.fl.data import Dataset
from fedquant.tools.report import Row
from fedquant.tools.runner import call_in_fresh_process, run_in_processes

#: the section name in ``--only``
SECTION = "federated"
AVAILABLE = True

Log = Callable[[str], None]

#: accuracy margin below the float32 reference that counts as reaching it (1 point)
MARGIN = 0.01
#: evaluated rounds at the end of the float32 runs that define the reference accuracy
LAST_K = 3


def flower_missing() -> str | None:
    """``None`` if Flower's simulation engine (flwr + Ray) is installed, else what is missing."""
    import importlib.util

    for mod, extra in (("flwr", "fedquant[flower]"), ("ray", "fedquant[flower-sim]")):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install '{extra}')"
    return None


def load_average() -> float | None:
    """The 1-minute load average, or ``None`` where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``) in bytes; ``None`` without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _max_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def rss_bytes() -> int:
    """This process's resident set size now (``VmRSS``), in bytes.

    Falls back to the peak (``ru_maxrss``) where ``/proc`` is missing.
    """
    now = _status_bytes("VmRSS")
    return now if now is not None else _max_rss_bytes()


def peak_rss_bytes(*seen: int) -> int:
    """The peak resident set size of this process so far, in bytes.

    ``VmHWM`` where ``/proc`` has it: ``ru_maxrss`` survives ``exec``, so a
    child process started by a large parent would report the parent's peak.
    Linux updates both from per-thread RSS counters it syncs only now and
    then, so they can lag a ``VmRSS`` read just before: the peak returned is
    at least every RSS in ``seen``.
    """
    peak = _status_bytes("VmHWM")
    return max(peak if peak is not None else _max_rss_bytes(), *seen, 0)


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One uplink setting of :func:`bytes_to_target`: a name and its ``RunConfig`` changes.

    Attributes
    ----------
    name : str
        Row label, e.g. ``"octav-stochastic-4-2-2-4"``.
    changes : tuple of (str, object)
        ``RunConfig`` fields set on top of the base configuration.
    description : str
        One line for the report.
    optional : bool
        A "beyond the paper" option: run only where ``RunConfig`` accepts it.
    """

    name: str
    changes: tuple[tuple[str, Any], ...]
    description: str
    optional: bool = False

    def config(self, base: RunConfig) -> RunConfig:
        """``base`` with this method's changes (raises ``ConfigError``/``TypeError`` if refused)."""
        return base.with_(**dict(self.changes))


def _method(name: str, description: str, *, optional: bool = False, **changes: Any) -> Method:
    return Method(name, tuple(changes.items()), description, optional)


#: the float32 reference: every float tensor travels as float32, FedAvg weights
FP32 = _method("fp32", "float32 upload, FedAvg", bits="32", aggregation="fedavg")

#: the methods compared (quantized ones use the default inverse-MSE aggregation)
CORE_METHODS: tuple[Method, ...] = (
    FP32,
    *(
        _method(
            f"octav-{rnd}-{bits}",
            f"OCTAV clipping, {rnd} rounding, {bits} bits",
            bits=bits,
            rounding=rnd,
            method="octav",
        )
        for rnd in ("stochastic", "nearest")
        for bits in ("2", "4", "8", "4-2-2-4")
    ),
    _method(
        "maxabs-stochastic-4-2-2-4",
        "max-abs scaling (no clipping), stochastic rounding, 4-2-2-4 bits",
        bits="4-2-2-4",
        rounding="stochastic",
        method="max",
    ),
)

#: options added beside the paper; each runs only if ``RunConfig`` accepts it (probed)
OPTIONAL_METHODS: tuple[Method, ...] = (
    _method(
        "octav-stochastic-4-2-2-4+rotation",
        "4-2-2-4, stochastic, randomized Hadamard rotation before OCTAV",
        optional=True,
        bits="4-2-2-4",
        rounding="stochastic",
        rotation=True,
    ),
    _method(
        "octav-stochastic-4-2-2-4+rans",
        "4-2-2-4, stochastic, rANS entropy coding of the codes",
        optional=True,
        bits="4-2-2-4",
        rounding="stochastic",
        entropy="rans",
    ),
    _method(
        "octav-stochastic-4-2-2-4+zstd",
        "4-2-2-4, stochastic, zstd on the payload",
        optional=True,
        bits="4-2-2-4",
        rounding="stochastic",
        entropy="zstd",
    ),
    _method(
        "octav-stochastic-auto:2.03",
        "widths allocated per tensor and round, 2.03 bits per weight on average",
        optional=True,
        bits="auto:2.03",
        rounding="stochastic",
    ),
    _method(
        "octav-stochastic-4-2-2-4+delta+ef",
        "4-2-2-4, stochastic, update (w - w_global) upload with error feedback",
        optional=True,
        bits="4-2-2-4",
        rounding="stochastic",
        upload="delta",
        error_feedback=True,
    ),
    _method(
        "octav-stochastic-2+delta+ef",
        "2 bits, stochastic, update (w - w_global) upload with error feedback",
        optional=True,
        bits="2",
        rounding="stochastic",
        upload="delta",
        error_feedback=True,
    ),
)

ALL_METHODS: tuple[Method, ...] = CORE_METHODS + OPTIONAL_METHODS


def resolve_methods(
    names: Sequence[str] | None = None,
    *,
    base: RunConfig | None = None,
    include_optional: bool = True,
) -> tuple[list[Method], list[str]]:
    """The methods to run, and one line per method left out (refused by ``RunConfig``).

    Parameters
    ----------
    names : sequence of str, optional
        Method names of :data:`ALL_METHODS`; default: all core methods, plus
        the optional ones if ``include_optional``. ``fp32`` (the reference) is
        always first, added if missing.
    base : RunConfig, optional
        The configuration the methods change (default ``RunConfig()``).
    include_optional : bool, default True

    Raises
    ------
    ConfigError
        If a name is not a known method.
    """
    base = base if base is not None else RunConfig()
    known = {m.name: m for m in ALL_METHODS}
    if names is None:
        chosen = [m for m in ALL_METHODS if include_optional or not m.optional]
    else:
        bad = [n for n in names if n not in known]
        if bad:
            raise ConfigError(
                "methods", f"unknown method(s) {bad}; expected some of {', '.join(known)}"
            )
        chosen = [known[n] for n in dict.fromkeys(names)]
    if FP32 not in chosen:
        chosen.insert(0, FP32)
    else:
        chosen.remove(FP32)
        chosen.insert(0, FP32)
    ok: list[Method] = []
    skipped: list[str] = []
    for m in chosen:
        try:
            m.config(base)
        except (FedquantError, TypeError, ValueError) as e:
            skipped.append(f"{m.name}: not accepted by RunConfig here ({e})")
            continue
        ok.append(m)
    return ok, skipped


# --------------------------------------------------------------------------- target logic


def accuracy_curve(metrics: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """``(round, test accuracy)`` of every evaluated round, in order."""
    return [(int(r["round"]), float(r["test_accuracy"])) for r in metrics if "test_accuracy" in r]


def reference_accuracy(metrics: Sequence[Mapping[str, Any]], k: int = LAST_K) -> float:
    """Mean test accuracy of the last ``k`` evaluated rounds (all of them if fewer).

    Raises
    ------
    FedquantError
        If no round was evaluated.
    """
    if k < 1:
        raise ConfigError("k", f"{k} is not a positive integer")
    curve = accuracy_curve(metrics)
    if not curve:
        raise FedquantError("reference_accuracy: the run evaluated no round")
    return float(np.mean([a for _, a in curve[-k:]]))


def target_accuracy(
    reference: Sequence[Mapping[str, Any]],
    *,
    k: int = LAST_K,
    margin: float = MARGIN,
) -> float:
    """The target of :func:`bytes_to_target`: a float32 run's reference accuracy minus ``margin``.

    ``reference`` holds the metrics of the float32 run with the same seed as
    the runs compared to it (same initial model, partition and mini-batch
    order: a paired comparison); its accuracy is :func:`reference_accuracy`
    (the mean of the last ``k`` evaluated rounds), steadier than one final
    round on a 1,000-image test set (one image = 0.1 point).
    """
    return reference_accuracy(reference, k) - margin


#: accuracies are counts over a test set (steps of 1/n); the target is a float mean minus a
#: margin, so "at least the target" is compared with this slack, far below one image
ACCURACY_SLACK = 1e-9


def first_reaching(metrics: Sequence[Mapping[str, Any]], target: float) -> Row | None:
    """The first evaluated round whose test accuracy is at least ``target``, or ``None``.

    "At least" allows :data:`ACCURACY_SLACK` of float round-off: a run at
    0.944 reaches a target computed as 0.9440000000000001.

    Returns ``{"round", "test_accuracy", "cum_uplink_bytes"}``: the uplink
    bytes received up to and including that round.
    """
    for r in metrics:
        acc = r.get("test_accuracy")
        if acc is not None and math.isfinite(acc) and acc >= target - ACCURACY_SLACK:
            return {
                "round": int(r["round"]),
                "test_accuracy": float(acc),
                "cum_uplink_bytes": int(r["cum_uplink_bytes"]),
            }
    return None


# --------------------------------------------------------------------------- runs


def small_dataset(dataset: Dataset, n_train: int, n_test: int) -> Dataset:
    """The first ``n_train`` / ``n_test`` examples of ``dataset`` (for smoke runs); 0 = all."""
    n_train = n_train or len(dataset.train_y)
    n_test = n_test or len(dataset.test_y)
    return dataclasses.replace(
        dataset,
        train_x=dataset.train_x[:n_train],
        train_y=dataset.train_y[:n_train],
        test_x=dataset.test_x[:n_test],
        test_y=dataset.test_y[:n_test],
    )


def _load(cfg: RunConfig, dataset: Dataset | None) -> Dataset:
    if dataset is not None:
        return dataset
    from fedquant.fl.data import load_dataset

    return load_dataset(cfg.dataset, cfg.data_root, cfg.cache_dir)


def run_metrics(cfg: RunConfig, dataset: Dataset | None = None) -> list[dict[str, Any]]:
    """Run ``cfg`` with the simulator from scratch; its per-round metrics."""
    from fedquant.fl.simulation import Simulation

    return Simulation(cfg, dataset=dataset).run().metrics


def _timed_run(cfg: RunConfig, dataset: Dataset | None) -> tuple[list[dict[str, Any]], Row]:
    """:func:`run_metrics` with its wall time and the load average before and after."""
    load_before = load_average()
    t0 = time.perf_counter()
    rows = run_metrics(cfg, dataset)
    timing = {
        "seconds": time.perf_counter() - t0,
        "threads": cfg.threads,
        "load_before": load_before,
        "load_after": load_average(),
    }
    return rows, timing


def _timed_run_item(
    item: tuple[int, RunConfig, Dataset],
) -> tuple[list[dict[str, Any]], Row]:
    """:func:`_timed_run` of one ``(index, config, data)`` item of a worker process."""
    _, cfg, data = item
    return _timed_run(cfg, data)


def bytes_to_target(
    base: RunConfig | None = None,
    *,
    methods: Sequence[str] | None = None,
    include_optional: bool = True,
    rounds: int = 20,
    seeds: Sequence[int] = (0, 1),
    k: int = LAST_K,
    margin: float = MARGIN,
    dataset: Dataset | None = None,
    workers: int = 1,
    log: Log | None = None,
) -> dict[str, Any]:
    """Uplink bytes each method needs to reach float32 FedAvg's accuracy minus ``margin``.

    Each run is paired with the float32 run of the same seed (same initial
    model, partition and mini-batch order): its target is that run's
    accuracy over its last ``k`` rounds minus ``margin``
    (:func:`target_accuracy`). Seeds change the partition and the
    initialization, which moves the final accuracy by about a point here, as
    much as the margin; pairing keeps that out of the comparison.

    Parameters
    ----------
    base : RunConfig, optional
        Everything but the uplink setting (default ``RunConfig()``: the
        embedded MNIST subset, 10 IID clients, the paper's CNN and training).
        ``rounds`` and the seed are overridden; every round is evaluated.
    methods : sequence of str, optional
        Names of :data:`ALL_METHODS` (see :func:`resolve_methods`).
    include_optional : bool, default True
        With ``methods=None``: also the options beside the paper that
        ``RunConfig`` accepts.
    rounds : int, default 20
    seeds : sequence of int, default (0, 1)
        Each method runs once per seed (same seeds for every method).
    k : int, default 3
        Evaluated rounds at the end of the float32 runs that set the reference.
    margin : float, default 0.01
        One point of accuracy.
    dataset : Dataset, optional
        Use this data set instead of loading ``base.dataset``.
    workers : int, default 1
        Runs in parallel, each in a fresh process with ``cpu_count // workers``
        torch threads (1 keeps everything in this process with the
        configured threads). Results do not depend on it beyond float
        rounding of the training's thread count.
    log : callable, optional
        Receives one progress line per run.

    Returns
    -------
    dict
        ``targets`` (per seed), ``reference`` and ``target`` (their means over
        seeds, for the report), the settings, ``runs``
        (one row per method and seed: the round and bytes at which it reached
        the target or ``None``, final accuracy, bytes per round, seconds,
        load average) and ``methods`` (one row per method: the median over
        seeds of the bytes to target -- ``None`` unless every seed reached it
        -- and its ratio to float32's, mean final accuracy), plus ``skipped``.
    """
    if rounds < 1:
        raise ConfigError("rounds", f"{rounds} is not a positive integer")
    if not seeds:
        raise ConfigError("seeds", "expected at least one seed")
    if workers < 1:
        raise ConfigError("workers", f"{workers} is not a positive integer")
    base = (base if base is not None else RunConfig()).with_(rounds=rounds, eval_every=1)
    chosen, skipped = resolve_methods(methods, base=base, include_optional=include_optional)
    data = _load(base, dataset)
    jobs = [(m, int(seed)) for m in chosen for seed in seeds]
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    configs = [m.config(base).with_(seed=seed, threads=threads or base.threads) for m, seed in jobs]
    metrics: dict[tuple[str, int], list[dict[str, Any]]] = {}
    runs: list[Row] = []

    def record(job: tuple[Method, int], result: tuple[list[dict[str, Any]], Row]) -> None:
        (m, seed), (rows, timing) = job, result
        metrics[m.name, seed] = rows
        curve = accuracy_curve(rows)
        runs.append(
            {
                "method": m.name,
                "seed": seed,
                "rounds": len(rows),
                "final_accuracy": curve[-1][1] if curve else math.nan,
                "best_accuracy": max(a for _, a in curve) if curve else math.nan,
                "last_k_accuracy": reference_accuracy(rows, k) if curve else math.nan,
                "uplink_bytes_total": int(rows[-1]["cum_uplink_bytes"]),
                "uplink_bytes_per_round": float(rows[-1]["cum_uplink_bytes"]) / len(rows),
                "uplink_ratio": float(np.mean([r["uplink_ratio"] for r in rows])),
                **timing,
                "accuracy": [a for _, a in curve],
            }
        )
        if log is not None:
            log(
                f"  {m.name} seed {seed}: final accuracy {runs[-1]['final_accuracy']:.3f}, "
                f"{runs[-1]['uplink_bytes_per_round']:,.0f} B/round, "
                f"{timing['seconds']:.0f} s (load {timing['load_before']})"
            )

    if workers <= 1:
        results = [_timed_run(cfg, data) for cfg in configs]
    else:
        done: dict[int, Any] = {}
        run_in_processes(
            _timed_run_item,
            [(i, cfg, data) for i, cfg in enumerate(configs)],
            workers=workers,
            threads=threads,
            on_done=lambda item, result: done.__setitem__(item[0], result),
        )
        for r in done.values():
            if isinstance(r, BaseException):
                raise r
        results = [done[i] for i in range(len(configs))]
    for job, result in zip(jobs, results, strict=True):  # in job order, however they finished
        record(job, result)
    targets = {
        int(s): target_accuracy(metrics[FP32.name, int(s)], k=k, margin=margin) for s in seeds
    }
    for row in runs:
        row["target"] = targets[row["seed"]]
        hit = first_reaching(metrics[row["method"], row["seed"]], row["target"])
        row["round_to_target"] = hit["round"] if hit else None
        row["bytes_to_target"] = hit["cum_uplink_bytes"] if hit else None
    summary = _method_rows(chosen, runs)
    return {
        "dataset": base.dataset,
        "num_clients": base.num_clients,
        "train_examples": len(data.train_y),
        "test_examples": len(data.test_y),
        "rounds": rounds,
        "seeds": [int(s) for s in seeds],
        "k": k,
        "margin": margin,
        "pairing": "per seed: each run's target is the float32 run with the same seed",
        "targets": {str(s): t for s, t in targets.items()},
        "reference": float(np.mean(list(targets.values()))) + margin,
        "target": float(np.mean(list(targets.values()))),
        "base": {
            k_: v
            for k_, v in base.to_dict().items()
            if k_ in ("num_clients", "partition", "epochs", "batch_size", "lr", "aggregation")
        },
        "methods": summary,
        "runs": runs,
        "skipped": skipped,
    }


def _method_rows(chosen: Sequence[Method], runs: Sequence[Row]) -> list[Row]:
    out: list[Row] = []
    for m in chosen:
        rs = [r for r in runs if r["method"] == m.name]
        reached = [r for r in rs if r["bytes_to_target"] is not None]
        all_reached = len(reached) == len(rs)
        out.append(
            {
                "method": m.name,
                "description": m.description,
                "optional": m.optional,
                "changes": json.dumps(dict(m.changes)),
                "seeds": len(rs),
                "reached": len(reached),
                "bytes_to_target": float(np.median([r["bytes_to_target"] for r in rs]))
                if all_reached
                else None,
                "rounds_to_target": float(np.median([r["round_to_target"] for r in rs]))
                if all_reached
                else None,
                "rounds_to_target_per_seed": [r["round_to_target"] for r in rs],
                "final_accuracy": float(np.mean([r["final_accuracy"] for r in rs])),
                "final_accuracy_min": float(min(r["final_accuracy"] for r in rs)),
                "final_accuracy_max": float(max(r["final_accuracy"] for r in rs)),
                "uplink_bytes_per_round": float(np.mean([r["uplink_bytes_per_round"] for r in rs])),
            }
        )
    fp32 = next((r for r in out if r["method"] == FP32.name), None)
    ref_bytes = fp32["bytes_to_target"] if fp32 else None
    ref_round = fp32["uplink_bytes_per_round"] if fp32 else None
    for r in out:
        btt = r["bytes_to_target"]
        r["bytes_vs_fp32"] = btt / ref_bytes if btt is not None and ref_bytes else None
        r["fewer_bytes_than_fp32"] = ref_bytes / btt if btt and ref_bytes else None
        r["per_round_vs_fp32"] = r["uplink_bytes_per_round"] / ref_round if ref_round else None
    return out


# --------------------------------------------------------------------------- overhead

#: functions of :mod:`fedquant.fl.simulation` wrapped with timers, and their category
TIMED: dict[str, str] = {
    "train_local": "train",
    "encode_model": "encode",
    "encode_delta": "encode",
    "admit": "admit",
    "aggregate_payloads": "aggregate",
    "apply_delta": "aggregate",
    "load_numpy_state": "load_state",
}
#: every category of the split, in report order ("broadcast" is ``Simulation.broadcast``;
#: "results" is the checkpoint and metrics files ``fedquant run`` writes after each round)
CATEGORIES = (
    "train",
    "evaluate",
    "encode",
    "admit",
    "aggregate",
    "broadcast",
    "load_state",
    "results",
)


@contextlib.contextmanager
def timed_simulation(sim: Any) -> Iterator[dict[str, list[float]]]:
    """Wrap the simulator's functions with timers while the block runs.

    Yields ``{category: [seconds, calls, CPU seconds]}`` that the wrapped functions add to
    (categories of :data:`CATEGORIES`), and ``"examples": [n, 0]``, the
    training examples ``train_local`` reported. CPU seconds are the
    process's (all threads), the figure least disturbed by other processes. The wrapped names are module
    attributes of :mod:`fedquant.fl.simulation` (the functions a round calls),
    ``sim.broadcast`` and the task's ``evaluate``; none of them calls another, so no time is counted
    twice. Names the simulator does not have are skipped. Everything is
    restored on exit.
    """
    from fedquant.fl import simulation as simmod

    acc: dict[str, list[float]] = {c: [0.0, 0, 0.0] for c in CATEGORIES}
    examples = acc.setdefault("examples", [0.0, 0, 0.0])

    def wrap(fn: Callable[..., Any], cat: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                out = fn(*args, **kwargs)
            finally:
                acc[cat][0] += time.perf_counter() - t0
                acc[cat][1] += 1
                acc[cat][2] += time.process_time() - c0
            if cat == "train":
                examples[0] += int(getattr(out, "num_examples", 0))
            return out

        return timed

    saved: dict[str, Any] = {}
    try:
        for name, cat in TIMED.items():
            fn = getattr(simmod, name, None)
            if callable(fn):
                saved[name] = fn
                setattr(simmod, name, wrap(fn, cat))
        sim.broadcast = wrap(sim.broadcast, "broadcast")
        task = sim.task
        sim.task = dataclasses.replace(task, evaluate=wrap(task.evaluate, "evaluate"))
        yield acc
    finally:
        for name, fn in saved.items():
            setattr(simmod, name, fn)
        sim.task = task
        with contextlib.suppress(AttributeError):
            del sim.broadcast  # back to the class's method


def _fit_slope(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)[0])


def overhead(
    cfg: RunConfig | None = None,
    *,
    dataset: Dataset | None = None,
    warmup: int = 1,
    log: Log | None = None,
) -> dict[str, Any]:
    """Per-round time split and memory of a run of ``cfg`` (default: ``RunConfig()``).

    Parameters
    ----------
    cfg : RunConfig, optional
        The run (default ``RunConfig()``: 10 clients, 30 rounds, 4-2-2-4).
    dataset : Dataset, optional
        Use this data set instead of loading ``cfg.dataset``.
    warmup : int, default 1
        Leading rounds left out of the steady-state figures (round 1 pays
        one-time costs: numba compiling the codec's kernels, torch's first
        calls); they stay in the ``all rounds`` figures and in ``rounds``.
    log : callable, optional
        Receives one line per round.

    Returns
    -------
    dict
        ``rounds``: one row per round with the seconds of each category of
        :data:`CATEGORIES`, ``other`` (the round's wall time not inside any
        of them: sampling, data gathering, metrics), ``non_training``
        (round - train - evaluate: the simulator's overhead, which counts the
        evaluation's scheduling and model loading but not its forward passes),
        the training examples, the same split in process CPU seconds
        (``cpu``, ``cpu_non_training``), RSS after the round and the load
        average;
        ``steady`` and ``all`` (sums over rounds after ``warmup`` / over all
        rounds, with the shares of the round time), ``samples_per_s``
        (training examples / training seconds), and ``memory`` (RSS slope per
        round after ``warmup``, the float32 size of the model, and whether
        the RSS is flat: slope x measured rounds below one float32 model).
    """
    from fedquant.fl.models import float32_state_bytes
    from fedquant.fl.results import ResultsDir
    from fedquant.fl.simulation import Simulation

    cfg = cfg if cfg is not None else RunConfig()
    data = _load(cfg, dataset)
    rss_start = rss_bytes()
    t0 = time.perf_counter()
    sim = Simulation(cfg, dataset=data)
    setup_s = time.perf_counter() - t0
    model_bytes = float32_state_bytes(sim.model)
    state = sim.new_state()
    rows: list[Row] = []
    with timed_simulation(sim) as acc, tempfile.TemporaryDirectory() as tmp:
        results = ResultsDir(Path(tmp))  # what `fedquant run` writes after each round
        while state.round < cfg.rounds:
            before = {c: v[0] for c, v in acc.items()}
            before_cpu = {c: v[2] for c, v in acc.items()}
            examples_before = acc["examples"][0]
            load_before = load_average()
            cpu0 = time.process_time()
            m = sim.run_round(state)
            t0, c0 = time.perf_counter(), time.process_time()
            results.write_round(state.round, state.global_state, state.metrics)
            acc["results"][0] += time.perf_counter() - t0
            acc["results"][2] += time.process_time() - c0
            cpu = time.process_time() - cpu0
            split = {c: acc[c][0] - before[c] for c in CATEGORIES}
            total = m.seconds_round + split["results"]
            row: Row = {"round": m.round, "seconds_round": total}
            row.update(split)
            row["other"] = total - sum(split.values())
            row["non_training"] = total - split["train"] - split["evaluate"]
            row["samples"] = int(acc["examples"][0] - examples_before)
            row["cpu_seconds"] = cpu
            cpu_split = {c: acc[c][2] - before_cpu[c] for c in CATEGORIES}
            row["cpu"] = cpu_split
            row["cpu_non_training"] = cpu - cpu_split["train"] - cpu_split["evaluate"]
            row["test_accuracy"] = m.test.get("accuracy")
            row["seconds_codec_metric"] = m.seconds_codec
            row["rss_bytes"] = rss_bytes()
            row["load"] = load_before
            rows.append(row)
            if log is not None:
                log(
                    f"  round {row['round']}: {total:.2f} s, train {split['train']:.2f} s, "
                    f"eval {split['evaluate']:.2f} s, other {row['non_training']:.3f} s, "
                    f"RSS {row['rss_bytes'] / 2**20:.1f} MiB (load {load_before})"
                )

    def sums(rs: Sequence[Row]) -> Row:
        keys = ("seconds_round", *CATEGORIES, "other", "non_training", "samples", "cpu_seconds")
        out: Row = {k: float(sum(r[k] for r in rs)) for k in keys}
        rt = out["seconds_round"] or math.nan
        out["rounds"] = len(rs)
        out["share_non_training"] = out["non_training"] / rt
        out["share_evaluate"] = out["evaluate"] / rt
        out["share_non_training_with_evaluate"] = (out["non_training"] + out["evaluate"]) / rt
        for c in (*CATEGORIES, "other"):
            out[f"share_{c}"] = out[c] / rt
        out["median_share_non_training"] = float(
            np.median([r["non_training"] / r["seconds_round"] for r in rs])
        )
        out["samples_per_s"] = out["samples"] / out["train"] if out["train"] else math.nan
        # the same split in process CPU time (all threads): least disturbed by other processes
        cpu_total = out["cpu_seconds"] or math.nan
        for c in CATEGORIES:
            out[f"cpu_{c}"] = float(sum(r["cpu"][c] for r in rs))
        out["cpu_non_training"] = float(sum(r["cpu_non_training"] for r in rs))
        out["cpu_share_non_training"] = out["cpu_non_training"] / cpu_total
        out["cpu_share_evaluate"] = out["cpu_evaluate"] / cpu_total
        out["cpu_share_train"] = out["cpu_train"] / cpu_total
        return out

    steady_rows = rows[warmup:] if len(rows) > warmup else rows
    slope = _fit_slope([r["round"] for r in steady_rows], [r["rss_bytes"] for r in steady_rows])
    growth = steady_rows[-1]["rss_bytes"] - steady_rows[0]["rss_bytes"]
    return {
        "config": {
            k: v
            for k, v in cfg.to_dict().items()
            if k in ("num_clients", "rounds", "bits", "rounding", "aggregation", "upload")
        },
        "train_examples": len(data.train_y),
        "test_examples": len(data.test_y),
        "setup_seconds": setup_s,
        "warmup": warmup,
        "threads": _torch_threads(),
        "rounds": rows,
        "steady": sums(steady_rows),
        "all": sums(rows),
        "memory": {
            "rss_start": rss_start,
            "rss_after_setup_round1": rows[0]["rss_bytes"],
            "rss_end": rows[-1]["rss_bytes"],
            "peak_rss": peak_rss_bytes(rss_start, *(r["rss_bytes"] for r in rows)),
            "slope_bytes_per_round": slope,
            "growth_bytes": growth,
            "measured_rounds": len(steady_rows),
            "model_float32_bytes": model_bytes,
        },
    }


def training_speed(
    threads: Sequence[int] = (1, 2),
    *,
    reps: int = 3,
    dataset: Dataset | None = None,
    cfg: RunConfig | None = None,
) -> list[Row]:
    """Samples/s of one local epoch (:func:`~fedquant.fl.client.train_local`) per thread count.

    The paper's CNN (or ``cfg.model``) trains on all of ``dataset``'s
    training images once per rep, from the same start; reps of the thread
    counts are interleaved and the row holds the median, the best rep and
    the process CPU time per sample, with the load average before and after.
    """
    import torch
    from torch.utils.data import TensorDataset

    from fedquant.fl import seeding
    from fedquant.fl.client import load_numpy_state, state_numpy, train_local
    from fedquant.fl.data import to_tensors
    from fedquant.fl.simulation import make_model, train_config
    from fedquant.fl.task import image_classification_task

    cfg = cfg if cfg is not None else RunConfig()
    data = _load(cfg, dataset)
    tensors = to_tensors(data)
    model = make_model(cfg, data.input_shape, data.num_classes)
    start = state_numpy(model)
    tc = train_config(cfg)
    before = torch.get_num_threads()
    times: dict[int, list[float]] = {t: [] for t in threads}
    cpu: dict[int, list[float]] = {t: [] for t in threads}
    load_before = load_average()
    try:
        for rep in range(reps + 1):  # rep 0 warms up
            for t in threads:
                torch.set_num_threads(t)
                load_numpy_state(model, start)
                c0 = time.process_time()
                st = train_local(
                    model,
                    TensorDataset(tensors.train_x, tensors.train_y),
                    image_classification_task(),
                    tc,
                    seeding.torch_generator(cfg.seed, seeding.Purpose.SHUFFLE, rep),
                )
                if rep:
                    times[t].append(st.seconds)
                    cpu[t].append(time.process_time() - c0)
    finally:
        torch.set_num_threads(before)
    n = len(data.train_y)
    return [
        {
            "threads": t,
            "samples": n,
            "reps": reps,
            "samples_per_s": n / float(np.median(times[t])),
            "best_samples_per_s": n / min(times[t]),
            "cpu_us_per_sample": 1e6 * float(np.median(cpu[t])) / n,
            "load_before": load_before,
            "load_after": load_average(),
        }
        for t in threads
    ]


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def profile_rounds(
    cfg: RunConfig | None = None,
    *,
    rounds: int = 2,
    top: int = 15,
    dataset: Dataset | None = None,
) -> list[Row]:
    """cProfile of ``rounds`` rounds after one warm-up round: the ``top`` functions by own time.

    Each row: ``function`` (``file:line(name)``), ``calls``, ``tottime``,
    ``cumtime`` (seconds) and ``share`` (own time / the profiled rounds'
    total). The profiler slows Python-heavy code more than torch's C++
    kernels, so shares here overstate the Python parts; use them to find
    where time goes, and :func:`overhead` for the split.
    """
    import cProfile
    import pstats

    from fedquant.fl.simulation import Simulation

    cfg = (cfg if cfg is not None else RunConfig()).with_(rounds=rounds + 1)
    sim = Simulation(cfg, dataset=_load(cfg, dataset))
    state = sim.new_state()
    sim.run_round(state)  # warm-up: JIT compilation and first calls
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(rounds):
        sim.run_round(state)
    prof.disable()
    st = pstats.Stats(prof)
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or math.nan
    items = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    out = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in items:
        short = file.split("site-packages/")[-1].split("/src/")[-1]
        out.append(
            {
                "function": f"{short}:{line}({name})",
                "calls": int(nc),
                "tottime": float(tt),
                "cumtime": float(ct),
                "share": float(tt) / total,
            }
        )
    return out


# --------------------------------------------------------------------------- memory vs clients


def _overhead_child(cfg: dict[str, Any], n_train: int, n_test: int, warmup: int) -> dict[str, Any]:
    """:func:`overhead` as run by :func:`overhead_in_fresh_process` (round lines on stderr)."""
    run = RunConfig.from_mapping(cfg)
    data = _load(run, None)
    if n_train or n_test:
        data = small_dataset(data, n_train, n_test)
    return overhead(
        run, dataset=data, warmup=warmup, log=lambda line: print(line, file=sys.stderr, flush=True)
    )


def overhead_in_fresh_process(
    cfg: RunConfig,
    *,
    n_train: int = 0,
    n_test: int = 0,
    warmup: int = 1,
    log: Log | None = None,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """:func:`overhead` of ``cfg`` in a new Python process (as ``fedquant run`` starts one).

    The benchmark's own process has by then allocated and freed the error and
    speed sections' 10M-element arrays: its heap is fragmented, and the RSS of
    the rounds steps up and down with the allocator's reuse of that space
    rather than with what the simulator holds. A fresh process measures the
    run as a user gets it. ``n_train``/``n_test`` > 0 keep only the first
    examples of the data set (:func:`small_dataset`). The child's per-round
    lines are passed to ``log`` when it ends.
    """
    out, stderr = call_in_fresh_process(
        f"{__name__}:_overhead_child",
        {"cfg": cfg.to_dict(), "n_train": n_train, "n_test": n_test, "warmup": warmup},
        timeout_s=timeout_s,
        failed="overhead: the measuring process failed",
    )
    if log is not None:
        for line in stderr.splitlines():
            if line.startswith("  round "):
                log(line)
    out["fresh_process"] = True
    return out


def memory_probe(
    num_clients: int,
    rounds: int,
    *,
    n_train: int = 0,
    n_test: int = 0,
    seed: int = 0,
    results: bool = False,
) -> Row:
    """RSS of this process around a run of ``rounds`` rounds with ``num_clients`` clients.

    Meant for a fresh process (:func:`memory_vs_clients` and
    :func:`memory_over_rounds` start one). The data (embedded MNIST, or its
    first ``n_train`` / ``n_test`` examples) is loaded before the first
    measurement, so only the simulator's own memory differs between counts.
    With ``results`` the checkpoint and metrics files are written after every
    round, as ``fedquant run`` does (to a temporary directory).
    """
    from fedquant.fl.data import load_dataset
    from fedquant.fl.results import ResultsDir
    from fedquant.fl.simulation import Simulation

    data = small_dataset(load_dataset("mnist-embedded"), n_train, n_test)
    cfg = RunConfig(num_clients=num_clients, rounds=rounds, seed=seed)
    rss_data = rss_bytes()
    sim = Simulation(cfg, dataset=data)
    rss_setup = rss_bytes()
    state = sim.new_state()
    after = []
    with tempfile.TemporaryDirectory() as tmp:
        rd = ResultsDir(Path(tmp)) if results else None
        for _ in range(rounds):
            sim.run_round(state)
            if rd is not None:
                rd.write_round(state.round, state.global_state, state.metrics)
            after.append(rss_bytes())
    return {
        "num_clients": num_clients,
        "rounds": rounds,
        "train_examples": len(data.train_y),
        "rss_data": rss_data,
        "rss_setup": rss_setup,
        "rss_rounds": after,
        "rss_end": after[-1],
        "peak_rss": peak_rss_bytes(rss_data, rss_setup, *after),
        "results": results,
    }


def _probe_in_fresh_process(args: Mapping[str, Any], timeout_s: float) -> Row:
    """:func:`memory_probe` with ``args`` in a new Python process."""
    row, _ = call_in_fresh_process(
        f"{__name__}:memory_probe",
        args,
        timeout_s=timeout_s,
        failed=f"memory probe ({dict(args)}) failed in its process",
    )
    return dict(row)


#: "flat": the RSS floor grows by less than this fraction of a float32 model per round
FLAT_PER_ROUND = 1 / 20


def memory_over_rounds(
    rounds: int = 200,
    *,
    num_clients: int = 10,
    n_train: int = 1000,
    n_test: int = 200,
    window: int = 10,
    warmup: int = 5,
    seed: int = 0,
    timeout_s: float = 1800.0,
) -> Row:
    """RSS over a long run in a fresh process (results files written every round).

    Single rounds' RSS jumps up and down by megabytes (the allocator keeping,
    then returning, transient buffers), so the growth is read off the
    *floor*: the smallest RSS of the first ``window`` rounds after ``warmup``
    and of the last ``window`` rounds. ``flat`` means the floor grows by less
    than :data:`FLAT_PER_ROUND` of a float32 model per round: nothing of a
    model's or a payload's size is kept per round (the metrics history the
    run keeps is a few KiB per round).
    """
    from fedquant.fl.models import PaperCNN, float32_state_bytes

    if rounds < warmup + 2 * window:
        raise ConfigError("rounds", f"{rounds} is too few; at least {warmup + 2 * window}")
    row = _probe_in_fresh_process(
        {
            "num_clients": num_clients,
            "rounds": rounds,
            "n_train": n_train,
            "n_test": n_test,
            "seed": seed,
            "results": True,
        },
        timeout_s,
    )
    rss = row["rss_rounds"]
    first, last = rss[warmup : warmup + window], rss[-window:]
    # rounds between the windows' middles
    span = (rounds - window // 2) - (warmup + window // 2)
    growth = min(last) - min(first)
    model_bytes = float32_state_bytes(PaperCNN())
    row |= {
        "window": window,
        "warmup": warmup,
        "floor_first": min(first),
        "floor_last": min(last),
        "floor_growth": growth,
        "floor_growth_per_round": growth / span,
        "max_minus_floor": max(rss[warmup:]) - min(rss[warmup:]),
        "model_float32_bytes": model_bytes,
        "flat": growth / span < FLAT_PER_ROUND * model_bytes,
        "load": load_average(),
    }
    return row


def memory_vs_clients(
    clients: Sequence[int] = (10, 100),
    *,
    rounds: int = 3,
    n_train: int = 0,
    n_test: int = 0,
    seed: int = 0,
    timeout_s: float = 900.0,
) -> list[Row]:
    """RSS of fresh processes running the same data split among ``clients`` clients.

    Each row is :func:`memory_probe`'s, plus ``extra_vs_first`` (its end RSS
    minus the first count's) and ``model_copies_would_add`` (the extra
    clients times the model's float32 size: what one model copy per client
    would cost).
    """
    from fedquant.fl.models import PaperCNN, float32_state_bytes

    model_bytes = float32_state_bytes(PaperCNN())
    rows: list[Row] = []
    for n in clients:
        row = _probe_in_fresh_process(
            {
                "num_clients": n,
                "rounds": rounds,
                "n_train": n_train,
                "n_test": n_test,
                "seed": seed,
            },
            timeout_s,
        )
        row["load"] = load_average()
        rows.append(row)
    first = rows[0]
    for row in rows:
        row["extra_vs_first"] = row["rss_end"] - first["rss_end"]
        row["model_copies_would_add"] = (row["num_clients"] - first["num_clients"]) * model_bytes
        row["model_float32_bytes"] = model_bytes
    return rows
