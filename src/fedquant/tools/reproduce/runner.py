"""Running the jobs of a reproduction grid on :mod:`fedquant.tools.runner`.

Each job writes its own results directory ``<raw>/<dataset>/<cell>/seed<k>/``::

    cell.json       the job: scale, data set, cell, seed, fingerprint, grid settings
    config.toml     the resolved RunConfig (``fedquant run --config`` reruns it,
                    without the train/test subset)
    meta.json       package versions, data set sizes
    clients.json    per-client label counts
    metrics.jsonl   one line per round (the simulator's metrics)
    summary.json    final figures; present = the job is finished
    checkpoint.npz  only while the job runs (deleted when it finishes)
    .lock           only while a process runs it

Skipping finished runs, rerunning stale or outdated ones, locks and worker
processes are the runner's (:mod:`fedquant.tools.runner`); this module says
what one job computes (:func:`execute`): the simulator on a class-stratified
subset of the data set, resumed from its checkpoint (bit-identical to an
uninterrupted run, see :mod:`fedquant.fl.simulation`), then the final model's
accuracy on the whole test split.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.errors import ConfigError
from fedquant.fl.results import ResultsDir
from fedquant.tools import runner
from fedquant.tools.report import write_json
from fedquant.tools.reproduce.grid import Job
from fedquant.tools.runner import JobResult, Outcome

__all__ = [
    "execute",
    "run_job",
    "run_jobs",
    "stratified_subset",
    "tensor_vnmse",
]


# --------------------------------------------------------------------------- data


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-stratified random subset of ``n`` of ``labels`` (sorted).

    Each class gets ``n`` times its share, rounded by largest remainder, so
    the subset's class proportions match the full set's to within one image.
    ``n >= len(labels)`` (or ``n == 0``) returns every index.

    Examples
    --------
    >>> y = np.array([0] * 6 + [1] * 3 + [2] * 1)
    >>> np.bincount(y[stratified_subset(y, 5, seed=0)]).tolist()
    [3, 2, 0]
    """
    y = np.asarray(labels)
    if n <= 0 or n >= y.size:
        return np.arange(y.size, dtype=np.int64)
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * (n / y.size)
    quota = np.floor(exact).astype(np.int64)
    short = n - int(quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
    rng = np.random.default_rng(seed)
    picked = [
        rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


_DATASETS: dict[tuple[str, str | None, str | None], Any] = {}


def _load_dataset(job: Job) -> Any:
    """The job's full data set, decoded once per process."""
    from fedquant.fl.data import load_dataset

    cfg = job.config
    key = (cfg.dataset, cfg.data_root, cfg.cache_dir)
    if key not in _DATASETS:
        _DATASETS[key] = load_dataset(cfg.dataset, cfg.data_root, cfg.cache_dir)
    return _DATASETS[key]


def _subset(job: Job, full: Any) -> Any:
    """The job's training subset and per-round test subset of ``full``."""
    from fedquant.fl.data import Dataset

    n_train = job.samples_per_client * job.config.num_clients
    tr = stratified_subset(full.train_y, n_train, job.subset_seed)
    te = stratified_subset(full.test_y, job.test_samples, job.subset_seed + 1)
    if tr.size == full.train_y.size and te.size == full.test_y.size:
        return full
    return Dataset(
        name=full.name,
        train_x=full.train_x[tr],
        train_y=full.train_y[tr],
        test_x=full.test_x[te],
        test_y=full.test_y[te],
        classes=full.classes,
    )


#: bit widths of :func:`tensor_vnmse`
VNMSE_BITS = (2, 4, 8)


def tensor_vnmse(
    state: Mapping[str, np.ndarray], bits: Sequence[int] = VNMSE_BITS
) -> dict[str, dict[str, float]]:
    """Per floating tensor, ``||w - Q(w)||^2 / ||w||^2`` at each width (OCTAV, nearest rounding).

    Returns ``{"<bits>": {tensor name: vNMSE}}``: which tensors of a trained
    model lose the most to quantization, one-dimensional ones (LayerNorm,
    biases) included even though uploads keep them in float32 by default.
    A tensor of zeros has vNMSE 0.
    """
    from fedquant.quant.quantizer import fake_quantize

    out: dict[str, dict[str, float]] = {}
    for b in bits:
        row = {}
        for name, w in state.items():
            if w.dtype.kind != "f" or w.size == 0:
                continue
            x = w.astype(np.float64)
            power = float(np.sum(x * x))
            err = fake_quantize(w, b, method="octav", rounding="nearest") - x
            row[name] = float(np.sum(err * err)) / power if power > 0 else 0.0
        out[str(b)] = row
    return out


def _run_workload(job: Job, d: Path) -> Outcome:
    """A job on a registered non-image workload (:data:`fedquant.fl.simulation.WORKLOADS`).

    The workload's own data and test set are used whole (a scale's
    ``samples_per_client`` and ``test_samples`` must be 0); the summary holds
    :func:`~fedquant.fl.simulation.run_summary`'s figures (``final_<metric>``,
    ``best_<metric>``) and the final value of every test metric.
    """
    from fedquant.fl.simulation import Simulation, resume_state, run_summary

    if job.samples_per_client or job.test_samples:
        raise ConfigError(
            "samples_per_client",
            f"{job.dataset} is a workload with its own data; expected samples_per_client = 0 "
            "and test_samples = 0 in the scale",
        )
    cfg = job.config
    sim = Simulation(cfg)
    rd = ResultsDir(d)
    state = resume_state(sim, rd)
    resumed_from = state.round  # a new run's start files are written by resume_state

    def on_round(st: Any, row: dict[str, Any]) -> None:
        rd.write_round(
            st.round, st.global_state, st.metrics, residuals=st.residuals, server_opt=st.server_opt
        )

    state = sim.run(state, on_round=on_round)
    m = state.metrics
    last_eval: dict[str, Any] = next(
        (r for r in reversed(m) if any(k.startswith("test_") for k in r)), {}
    )
    summary = {
        **run_summary(m, sim.task, wall_seconds=0.0, results_dir=str(d)),
        **{f"final_{k[5:]}": v for k, v in last_eval.items() if k.startswith("test_")},
        "metric": sim.task.metric,
        "higher_is_better": sim.task.higher_is_better,
        "final_model_vnmse": tensor_vnmse(state.global_state),
    }
    return Outcome(summary, resumed_from)


def execute(job: Job, d: Path) -> Outcome:
    """Run (or resume) ``job`` in its directory ``d``: the ``execute`` of :func:`run_job`.

    Returns the summary's figures: final accuracy and loss on the whole test
    split (unless the scale says ``final_on_subset``), the per-round subset's
    last and best accuracy, uplink and downlink bytes, and the simulator's
    timings; for a workload, :func:`_run_workload`'s.
    """
    from fedquant.fl.client import evaluate, load_numpy_state
    from fedquant.fl.data import Dataset, to_tensors
    from fedquant.fl.simulation import (
        TIMING_KEYS,
        WORKLOADS,
        RunState,
        Simulation,
        final_accuracy,
    )

    if job.config.dataset in WORKLOADS:
        return _run_workload(job, d)
    cfg = job.config
    full = _load_dataset(job)
    data = _subset(job, full)
    sim = Simulation(cfg, dataset=data)
    rd = ResultsDir(d)
    ck = rd.read_checkpoint()
    if ck is not None:
        state = RunState(round=ck[0], global_state=ck[1], metrics=ck[2])
        resumed_from = state.round
    else:
        state, resumed_from = sim.new_state(), 0
        rd.write_start(
            cfg,
            {
                "dataset": {
                    "name": full.name,
                    "train_full": int(full.train_y.size),
                    "test_full": int(full.test_y.size),
                    "train_used": int(data.train_y.size),
                    "test_per_round": int(data.test_y.size),
                    "classes": list(full.classes),
                },
                "float32_model_bytes": sim.reference.float32_nbytes,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        write_json(
            d / "clients.json",
            {"label_counts": sim.label_counts.tolist(), "sizes": [int(p.size) for p in sim.parts]},
        )

    def on_round(st: RunState, row: dict[str, Any]) -> None:
        rd.write_round(st.round, st.global_state, st.metrics)

    state = sim.run(state, on_round=on_round)
    m = state.metrics

    # the final accuracy on the whole test split (rounds may use a subset)
    subset_acc = final_accuracy(m)
    final_loss: float | None
    if data.test_y.size != full.test_y.size and not job.final_on_subset:
        t0 = time.perf_counter()
        whole = to_tensors(
            Dataset(full.name, data.train_x, data.train_y, full.test_x, full.test_y, full.classes)
        )  # normalized with the same (training-subset) statistics as the run
        load_numpy_state(sim.model, state.global_state)
        final_loss, final_acc = evaluate(sim.model, whole.test_x, whole.test_y)
        final_eval_s = time.perf_counter() - t0
    else:
        final_acc = subset_acc
        final_loss = next((r["test_loss"] for r in reversed(m) if "test_loss" in r), None)
        final_eval_s = 0.0

    up = [r for r in m if r["uplink_bytes"]]
    last_up = up[-1] if up else m[-1]
    n_up = max(1, last_up["clients_aggregated"])
    evaluated = [r["test_accuracy"] for r in m if r.get("test_accuracy") is not None]
    timing = {k: float(sum(r.get(k, 0.0) for r in m)) for k in TIMING_KEYS}
    summary = {
        "final_accuracy": final_acc,
        "final_loss": final_loss,
        "final_accuracy_test_samples": int(
            data.test_y.size if job.final_on_subset else full.test_y.size
        ),
        "last_round_accuracy_subset": subset_acc,
        "best_round_accuracy_subset": max(evaluated) if evaluated else None,
        "test_samples_per_round": int(data.test_y.size),
        "train_samples": int(data.train_y.size),
        "rounds": state.round,
        "uplink_bytes_per_client_round": last_up["uplink_bytes"] / n_up,
        "uplink_float32_bytes_per_client_round": last_up["uplink_float32_bytes"] / n_up,
        "uplink_ratio_vs_float32": last_up["uplink_ratio"],
        "total_uplink_bytes": m[-1]["cum_uplink_bytes"],
        "total_downlink_bytes": m[-1]["cum_downlink_bytes"],
        "compute_seconds": timing["seconds_round"] + final_eval_s,
        "seconds_final_eval": final_eval_s,
        **timing,
    }
    return Outcome(summary, resumed_from)


def run_job(
    job: Job, raw_root: str | os.PathLike[str], *, rerun_outdated: bool = False
) -> JobResult:
    """:func:`fedquant.tools.runner.run_job` with :func:`execute`."""
    return runner.run_job(job, raw_root, execute, rerun_outdated=rerun_outdated)


def run_jobs(
    jobs: Sequence[Job],
    raw_root: str | os.PathLike[str],
    *,
    n_jobs: int = 1,
    in_process: bool = False,
    on_result: Callable[[JobResult, int, int], None] | None = None,
    argv: Sequence[str] = (),
    rerun_outdated: bool = True,
) -> list[JobResult]:
    """:func:`fedquant.tools.runner.run_jobs` with :func:`execute`."""
    return runner.run_jobs(
        jobs,
        raw_root,
        execute,
        n_jobs=n_jobs,
        in_process=in_process,
        on_result=on_result,
        argv=argv,
        rerun_outdated=rerun_outdated,
    )
