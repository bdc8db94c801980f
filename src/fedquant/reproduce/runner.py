"""Running the jobs of a grid: resumable, lock-protected, optionally in parallel processes.

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

A job whose ``summary.json`` exists with the grid's fingerprint is skipped (unless
it was computed by another fedquant source and ``rerun_outdated`` is set); one
with a checkpoint resumes from it (bit-identical to an uninterrupted run, see
:mod:`fedquant.fl.simulation`); one whose recorded fingerprint differs from the
grid's is cleared and rerun. The ``.lock`` file (created with ``O_EXCL``)
lets several ``fedquant reproduce`` processes, or a process pool, share one
grid without running a job twice; a lock left by a dead process on this host
is taken over.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import resource
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.errors import ConfigError, FedquantError
from fedquant.fl.results import ResultsDir, atomic_write, write_json
from fedquant.reproduce.grid import Job

__all__ = [
    "JobResult",
    "LoadSampler",
    "job_status",
    "read_invocations",
    "run_job",
    "run_jobs",
    "run_source",
    "source_commit",
    "source_fingerprint",
    "stratified_subset",
]

LOCK = ".lock"
#: every file a job writes; a stale job's directory is cleared of these only.
RESULT_FILES = (
    "cell.json",
    "config.toml",
    "meta.json",
    "clients.json",
    "metrics.jsonl",
    "summary.json",
    "checkpoint.npz",
    "error.txt",
)
#: glibc settings that made allocation-heavy torch code up to 1.8x faster on this
#: project's 2-core machines (big allocations reuse memory instead of a fresh mmap
#: per tensor); set for worker processes unless the user set them.
_CHILD_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
}


_GITIGNORE = """\
# written by fedquant reproduce: files of running or interrupted runs
.lock
checkpoint.npz
.*.npz.*
.*.json.*
.*.jsonl.*
.*.toml.*
"""


@dataclass
class JobResult:
    """What happened to one job in this invocation.

    ``status`` is ``"done"`` (ran to the end now), ``"skipped"`` (already
    finished), ``"busy"`` (another live process holds its lock) or
    ``"failed"`` (``error`` says why; the traceback is in ``error.txt``).
    """

    key: str
    status: str
    final_accuracy: float | None = None
    seconds: float = 0.0
    resumed_from: int = 0
    load_avg: float | None = None
    error: str | None = None


# --------------------------------------------------------------------------- provenance


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """16 hex digits of SHA-256 over the ``.py`` files of the imported fedquant package.

    The ``reproduce``, ``bench`` and ``flower`` subpackages are left out: they
    do not compute a run's numbers. Runs with different fingerprints were made by different code
    (the report says so).
    """
    import fedquant

    root = Path(fedquant.__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("reproduce/", "bench/", "flower/")):
            continue
        h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def source_commit(where: Path) -> str | None:
    """``git rev-parse HEAD`` of the checkout holding ``where`` (``+dirty`` when the package
    has uncommitted changes); ``None`` outside a git checkout or without git."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


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


# --------------------------------------------------------------------------- locks and status


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_holder_alive(path: Path) -> bool:
    """True unless the lock names a process of this host that no longer exists."""
    try:
        host, pid = path.read_text().split()
        return host != socket.gethostname() or _pid_alive(int(pid))
    except FileNotFoundError:
        return False
    except ValueError:  # half-written lock: treat as stale only if old
        return time.time() - path.stat().st_mtime < 60


def _acquire(d: Path) -> bool:
    p = d / LOCK
    for _ in range(2):
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_holder_alive(p):
                return False
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    return False


def _release(d: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (d / LOCK).unlink()


def run_source(job: Job, raw_root: Path) -> str | None:
    """The source fingerprint a finished run recorded (``None``: unfinished or unrecorded)."""
    summary = _read_json(job.directory(raw_root) / "summary.json")
    return summary.get("source_sha256") if isinstance(summary, dict) else None


def job_status(job: Job, raw_root: Path, source: str | None = None) -> str:
    """``"alias"``, ``"done"``, ``"outdated"``, ``"stale"``, ``"running"``, ``"partial"``, ``"missing"``.

    ``"stale"``: the grid's settings changed since the run; ``"outdated"`` (only
    when ``source`` is given): the run finished, computed by a fedquant source
    other than ``source``.
    """
    if job.alias_of is not None:
        return "alias"
    d = job.directory(raw_root)
    info = _read_json(d / "cell.json")
    if info is not None and info.get("fingerprint") != job.fingerprint:
        return "stale"
    if info is not None and (d / "summary.json").exists():
        if source is not None and run_source(job, raw_root) != source:
            return "outdated"
        return "done"
    if (d / LOCK).exists() and _lock_holder_alive(d / LOCK):
        return "running"
    if info is not None and (d / "checkpoint.npz").exists():
        return "partial"
    return "missing"


def _clear(d: Path) -> None:
    for name in RESULT_FILES:
        with contextlib.suppress(FileNotFoundError):
            (d / name).unlink()
    _clear_debris(d)


def _clear_debris(d: Path) -> None:
    """Temporary files of atomic writes that a killed process left behind."""
    for name in RESULT_FILES:
        for p in d.glob(f".{name}.*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


# --------------------------------------------------------------------------- one job


def _cell_record(job: Job) -> dict[str, Any]:
    return {
        "scale": job.scale,
        "dataset": job.dataset,
        "cell": job.cell,
        "seed": job.seed,
        "fingerprint": job.fingerprint,
        "settings": dict(job.settings),
        "samples_per_client": job.samples_per_client,
        "test_samples": job.test_samples,
        "subset_seed": job.subset_seed,
    }


def run_job(
    job: Job, raw_root: str | os.PathLike[str], *, rerun_outdated: bool = False
) -> JobResult:
    """Run (or resume, or skip) one job; never raises for a failure inside the run.

    Parameters
    ----------
    job : Job
        Not an alias.
    raw_root : path
        The raw-results folder of the scale.
    rerun_outdated : bool, default False
        Rerun a finished job whose recorded source fingerprint is not
        :func:`source_fingerprint` (else it is skipped).

    Returns
    -------
    JobResult
    """
    d = job.directory(Path(raw_root))
    d.mkdir(parents=True, exist_ok=True)
    if not _acquire(d):
        return JobResult(job.key, "busy")
    try:
        info = _read_json(d / "cell.json")
        if info is not None and info.get("fingerprint") == job.fingerprint:
            summary = _read_json(d / "summary.json")
            outdated = (
                rerun_outdated
                and summary is not None
                and summary.get("source_sha256") != source_fingerprint()
            )
            if summary is not None and not outdated:
                return JobResult(job.key, "skipped", final_accuracy=summary.get("final_accuracy"))
            if outdated:
                _clear(d)
                write_json(d / "cell.json", _cell_record(job))
        else:
            _clear(d)  # stale or half-created: start afresh
            write_json(d / "cell.json", _cell_record(job))
        _clear_debris(d)
        try:
            return _run(job, d)
        except Exception as e:
            with atomic_write(d / "error.txt", "w") as f:
                f.write(traceback.format_exc())
            msg = str(e) if isinstance(e, FedquantError) else f"{type(e).__name__}: {e}"
            return JobResult(job.key, "failed", error=msg)
    finally:
        _release(d)


def _provenance(
    cfg: Any, t_start: float, cpu_start: float, load_start: float, resumed_from: int
) -> dict[str, Any]:
    """The summary entries every job records: time, load, where it ran, which code."""
    return {
        "wall_seconds": time.perf_counter() - t_start,
        # CPU time of this process (all its threads): what the run costs on an idle machine
        "cpu_seconds": time.process_time() - cpu_start,
        "resumed_from_round": resumed_from,
        "load_avg_1min_start": load_start,
        "load_avg_1min_end": os.getloadavg()[0],
        "threads": cfg.threads,
        "device": cfg.device,
        "source_sha256": source_fingerprint(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _finish(job: Job, d: Path, rd: ResultsDir, summary: dict[str, Any]) -> JobResult:
    rd.write_summary(summary)
    for leftover in ("checkpoint.npz", "error.txt"):  # keep the committed folder small
        with contextlib.suppress(FileNotFoundError):
            (d / leftover).unlink()
    acc = summary.get("final_accuracy")
    return JobResult(
        job.key,
        "done",
        final_accuracy=None if acc is None else float(acc),
        seconds=summary["wall_seconds"],
        resumed_from=summary["resumed_from_round"],
        load_avg=summary["load_avg_1min_end"],
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


def _run_workload(job: Job, d: Path) -> JobResult:
    """A job on a registered non-image workload (:data:`fedquant.fl.simulation.WORKLOADS`).

    The workload's own data and test set are used whole (a scale's
    ``samples_per_client`` and ``test_samples`` must be 0); the summary holds
    :func:`~fedquant.fl.simulation.run_summary`'s figures (``final_<metric>``,
    ``best_<metric>``) and the final value of every test metric.
    """
    from fedquant.fl.simulation import Simulation, resume_state, run_summary

    t_start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
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

    def on_round(st: Any, _record: Any) -> None:
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
        **_provenance(cfg, t_start, cpu_start, load_start, resumed_from),
    }
    return _finish(job, d, rd, summary)


def _run(job: Job, d: Path) -> JobResult:
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
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    load_start = os.getloadavg()[0]
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

    def on_round(st: RunState, _record: Any) -> None:
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
        **_provenance(cfg, t_start, cpu_start, load_start, resumed_from),
    }
    return _finish(job, d, rd, summary)


# --------------------------------------------------------------------------- many jobs


class LoadSampler:
    """Samples the 1-minute load average every ``interval`` seconds in a daemon thread.

    ``on_sample`` (if given) is called after each sample, from that thread.
    """

    def __init__(self, interval: float = 10.0, on_sample: Callable[[], None] | None = None) -> None:
        self.interval = interval
        self.on_sample = on_sample
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self.on_sample is not None:
                with contextlib.suppress(OSError):
                    self.on_sample()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append(os.getloadavg()[0])

    def stats(self) -> dict[str, float | int]:
        s = list(self.samples) or [os.getloadavg()[0]]
        return {
            "load_min": min(s),
            "load_mean": float(np.mean(s)),
            "load_max": max(s),
            "load_samples": len(s),
        }


@contextlib.contextmanager
def _child_env(threads: int) -> Iterator[None]:
    """Environment for spawned workers: glibc malloc settings, thread counts."""
    env = dict(_CHILD_ENV)
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


@dataclass
class RunLog:
    """One invocation's record: ``<raw>/invocations/<started>-<pid>.json``.

    Written when the invocation starts, rewritten with the wall time and load
    so far at every load sample (so a killed invocation leaves a record that is
    at most one interval old) and at the end (``status`` ``"finished"``, or
    ``"interrupted"``).
    """

    argv: list[str]
    started: str
    jobs: int
    threads: int
    cpu_count: int | None
    host: str
    pid: int
    pending: int
    source_sha256: str
    #: the git commit of the source tree (``+dirty`` if it had uncommitted changes), if known
    source_commit: str | None = None
    pythonpath: str | None = None
    status: str = "running"
    #: CPU seconds of this process and its finished worker processes (getrusage)
    cpu_seconds: float = 0.0
    results: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    load: Mapping[str, float | int] = field(default_factory=dict)


INVOCATIONS = "invocations"


def read_invocations(raw: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every invocation record under ``raw`` (oldest first)."""
    out = []
    folder = Path(raw) / INVOCATIONS
    if folder.is_dir():
        for p in sorted(folder.glob("*.json")):
            rec = _read_json(p)
            if isinstance(rec, dict):
                out.append(rec)
    return sorted(out, key=lambda r: str(r.get("started", "")))


def run_jobs(
    jobs: Sequence[Job],
    raw_root: str | os.PathLike[str],
    *,
    n_jobs: int = 1,
    in_process: bool = False,
    on_result: Callable[[JobResult, int, int], None] | None = None,
    argv: Sequence[str] = (),
    sample_interval: float = 30.0,
    rerun_outdated: bool = True,
) -> list[JobResult]:
    """Run every unfinished, non-alias job of ``jobs``.

    Parameters
    ----------
    jobs : sequence of Job
    raw_root : path
        The scale's raw-results folder.
    n_jobs : int, default 1
        Worker processes (``spawn``ed; each imports torch once and runs jobs
        one after another). Give each job ``threads = cores / n_jobs``.
    in_process : bool, default False
        Run in this process instead (``n_jobs`` is then ignored): no start-up
        cost, no isolation; for tests and debugging.
    on_result : callable, optional
        ``on_result(result, finished_so_far, total)`` after each job.
    argv : sequence of str
        The command line, for the invocation record (see :class:`RunLog`).
    sample_interval : float, default 30
        Seconds between load-average samples (and record updates).
    rerun_outdated : bool, default True
        Rerun finished jobs computed by another fedquant source (see
        :func:`source_fingerprint`); False keeps them.

    Returns
    -------
    list of JobResult
        One per job that was pending when the call started, in completion order.
    """
    import fedquant

    raw = Path(raw_root)
    raw.mkdir(parents=True, exist_ok=True)
    ignore = raw / ".gitignore"
    if not ignore.exists():  # what a running or killed job leaves is not for committing
        ignore.write_text(_GITIGNORE)
    current = source_fingerprint() if rerun_outdated else None
    pending = [j for j in jobs if j.alias_of is None and job_status(j, raw, current) != "done"]
    threads = max((j.config.threads for j in jobs), default=0)
    record = RunLog(
        argv=list(argv),
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        jobs=1 if in_process else n_jobs,
        threads=threads,
        cpu_count=os.cpu_count(),
        host=socket.gethostname(),
        pid=os.getpid(),
        pending=len(pending),
        source_sha256=source_fingerprint(),
        source_commit=source_commit(Path(fedquant.__file__).resolve().parent),
        pythonpath=os.environ.get("PYTHONPATH"),
    )
    results: list[JobResult] = []
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    record_path = raw / INVOCATIONS / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    lock = threading.Lock()

    def save() -> None:
        if not pending:
            return
        with lock:
            record.wall_seconds = time.perf_counter() - t0
            record.cpu_seconds = _cpu_seconds() - cpu0
            record.load = sampler.stats()
            record.results = {}
            for r in list(results):
                record.results[r.status] = record.results.get(r.status, 0) + 1
            write_json(record_path, asdict(record))

    def done(r: JobResult) -> None:
        results.append(r)
        if on_result is not None:
            on_result(r, len(results), len(pending))

    sampler = LoadSampler(sample_interval, on_sample=save)
    try:
        with _sigterm_as_interrupt(), sampler:
            if in_process or not pending:
                for j in pending:
                    done(run_job(j, raw, rerun_outdated=rerun_outdated))
            else:
                _run_pool(pending, raw, n_jobs, threads, done, rerun_outdated)
        record.status = "finished"
    except BaseException:
        record.status = "interrupted"
        raise
    finally:
        save()
    return results


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C goes to the parent, which then stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _terminate_workers(ex: ProcessPoolExecutor) -> None:
    # The executor has no public way to stop running tasks; a terminated worker
    # leaves its last atomic checkpoint and a lock that the next run takes over.
    procs = list((getattr(ex, "_processes", None) or {}).values())
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(timeout=10)


def _run_pool(
    pending: Sequence[Job],
    raw: Path,
    n_jobs: int,
    threads: int,
    done: Callable[[JobResult], None],
    rerun_outdated: bool,
) -> None:
    ex = ProcessPoolExecutor(
        max_workers=max(1, n_jobs),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_ignore_sigint,
    )
    with _child_env(threads):  # workers are spawned on demand, by submit()
        futures: dict[Future[JobResult], Job] = {
            ex.submit(run_job, j, raw, rerun_outdated=rerun_outdated): j for j in pending
        }
    try:
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for f in finished:
                job = futures[f]
                try:
                    done(f.result())
                except BrokenProcessPool as e:
                    done(JobResult(job.key, "failed", error=f"worker process died: {e}"))
                except Exception as e:  # pragma: no cover - run_job catches its own errors
                    done(JobResult(job.key, "failed", error=f"{type(e).__name__}: {e}"))
    except BaseException:
        _terminate_workers(ex)  # before shutdown(), which forgets the worker processes
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread, make SIGTERM clean up like Ctrl-C (workers stopped, record saved)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
