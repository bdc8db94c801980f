"""The experiment runner of the tools: config × seed grids, resumable, in parallel processes.

A *job* is one run of a grid (one configuration and seed) with its own
results directory ``<raw>/<job.directory>/``. What a job computes is the
caller's ``execute(job, directory)``; this module adds what every grid needs:

* **skip done runs by fingerprint** -- ``cell.json`` records the job
  (:meth:`GridJob.record`, with the job's ``fingerprint``: a hash of its
  settings); a job whose ``summary.json`` exists under the same fingerprint is
  skipped, one whose recorded fingerprint differs is cleared and rerun;
* **rerun outdated runs** -- every summary records the
  :func:`source_fingerprint` of the code that computed it; with
  ``rerun_outdated`` a run made by other code is rerun;
* **parallel processes** -- :func:`run_jobs` runs jobs in ``spawn``ed worker
  processes (:func:`run_in_processes`); a ``.lock`` file per job (created
  with ``O_EXCL``) lets several invocations share a grid, and a lock left by a
  dead process on this host is taken over;
* **results to files** -- the summary (the caller's figures plus time, load
  and source, see :func:`run_job`) in ``summary.json``, a traceback in
  ``error.txt``, and a record per invocation in ``<raw>/invocations/``.

:func:`call_in_fresh_process` runs one function in a new Python process (for
measurements that must not see the caller's heap).
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
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from fedquant.errors import FedquantError
from fedquant.fl.files import atomic_write
from fedquant.tools.report import Row, environment, write_json

__all__ = [
    "GridJob",
    "JobResult",
    "LoadSampler",
    "Outcome",
    "call_in_fresh_process",
    "job_status",
    "read_invocations",
    "run_in_processes",
    "run_job",
    "run_jobs",
    "run_source",
    "source_fingerprint",
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
#: glibc settings that make allocation-heavy torch code faster on small machines (big
#: allocations reuse memory instead of a fresh mmap per tensor); set for worker
#: processes unless the user set them.
_CHILD_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
}

_GITIGNORE = """\
# written by the fedquant runner: files of running or interrupted runs
.lock
checkpoint.npz
.*.npz.*
.*.json.*
.*.jsonl.*
.*.toml.*
"""

#: folders and modules of the package that do not compute a run's numbers
_NOT_COMPUTING = ("tools/", "bench/", "flower/", "cli.py", "argparsing.py")

T = TypeVar("T")
R = TypeVar("R")


class GridJob(Protocol):
    """What :func:`run_job` needs of a job (``fedquant.tools.reproduce.grid.Job`` is one)."""

    @property
    def key(self) -> str:
        """A name unique in the grid (progress lines, results)."""

    @property
    def fingerprint(self) -> str:
        """A hash of the settings the job computes with (not of where or how fast)."""

    @property
    def alias_of(self) -> str | None:
        """Another job with identical settings whose results are this one's (then not run)."""

    @property
    def config(self) -> Any:
        """The run's :class:`~fedquant.fl.config.RunConfig` (``threads``, ``device``)."""

    def directory(self, raw_root: Path) -> Path:
        """The job's results directory under ``raw_root``."""

    def record(self) -> Row:
        """What ``cell.json`` records of the job (with ``"fingerprint"``)."""


@dataclass(frozen=True)
class Outcome:
    """What an ``execute(job, directory)`` function returns to :func:`run_job`."""

    #: the run's figures (the runner adds time, load and source, then writes summary.json)
    summary: Row
    #: the round the run resumed from (0: started afresh)
    resumed_from: int = 0


#: ``execute(job, directory)``: compute the job in its (locked, prepared) directory
Execute = Callable[[Any, Path], Outcome]


@dataclass
class JobResult:
    """What happened to one job in this invocation.

    ``status`` is ``"done"`` (ran to the end now), ``"skipped"`` (already
    finished), ``"busy"`` (another live process holds its lock) or
    ``"failed"`` (``error`` says why; the traceback is in ``error.txt``).
    """

    key: str
    status: str
    #: the run's summary.json (done or skipped jobs)
    summary: Row | None = None
    error: str | None = None

    @property
    def final_accuracy(self) -> float | None:
        """The summary's ``final_accuracy`` (None without one)."""
        acc = (self.summary or {}).get("final_accuracy")
        return None if acc is None else float(acc)

    @property
    def seconds(self) -> float:
        """Wall seconds of the run in this invocation (0 unless done now)."""
        return (
            float((self.summary or {}).get("wall_seconds", 0.0)) if self.status == "done" else 0.0
        )

    @property
    def resumed_from(self) -> int:
        """The round a run done now resumed from (0: it started afresh)."""
        return (
            int((self.summary or {}).get("resumed_from_round", 0)) if self.status == "done" else 0
        )

    @property
    def load_avg(self) -> float | None:
        """The 1-minute load average when a run done now ended."""
        return (self.summary or {}).get("load_avg_1min_end") if self.status == "done" else None


# --------------------------------------------------------------------------- provenance


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """16 hex digits of SHA-256 over the ``.py`` files of the imported fedquant package.

    The tools, the Flower adapter and the command line are left out: they do
    not compute a run's numbers. Runs with different fingerprints were made by
    different code.
    """
    import fedquant

    root = Path(fedquant.__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(_NOT_COMPUTING):
            continue
        h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


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


def run_source(job: GridJob, raw_root: Path) -> str | None:
    """The source fingerprint a finished run recorded (``None``: unfinished or unrecorded)."""
    summary = _read_json(job.directory(raw_root) / "summary.json")
    return summary.get("source_sha256") if isinstance(summary, dict) else None


def job_status(job: GridJob, raw_root: Path, source: str | None = None) -> str:
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


def run_job(
    job: GridJob,
    raw_root: str | os.PathLike[str],
    execute: Execute,
    *,
    rerun_outdated: bool = False,
) -> JobResult:
    """Run (or resume, or skip) one job; never raises for a failure inside the run.

    Parameters
    ----------
    job : GridJob
        Not an alias.
    raw_root : path
        The grid's raw-results folder.
    execute : callable
        ``execute(job, directory) -> Outcome``: runs the job in its directory
        (resuming from what it left there, if it can). A module-level function,
        so that worker processes can import it.
    rerun_outdated : bool, default False
        Rerun a finished job whose recorded source fingerprint is not
        :func:`source_fingerprint` (else it is skipped).

    Returns
    -------
    JobResult
        For a run done now, ``summary`` is ``execute``'s plus ``wall_seconds``,
        ``cpu_seconds`` (this process, all threads), ``resumed_from_round``,
        the 1-minute load average at start and end, ``threads``, ``device``,
        ``source_sha256`` and ``finished`` (a timestamp).
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
                return JobResult(job.key, "skipped", summary=summary)
            if outdated:
                _clear(d)
                write_json(d / "cell.json", job.record())
        else:
            _clear(d)  # stale or half-created: start afresh
            write_json(d / "cell.json", job.record())
        _clear_debris(d)
        try:
            return _execute(job, d, execute)
        except Exception as e:
            with atomic_write(d / "error.txt", "w") as f:
                f.write(traceback.format_exc())
            msg = str(e) if isinstance(e, FedquantError) else f"{type(e).__name__}: {e}"
            return JobResult(job.key, "failed", error=msg)
    finally:
        _release(d)


def _execute(job: GridJob, d: Path, execute: Execute) -> JobResult:
    t_start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    out = execute(job, d)
    summary = {
        **out.summary,
        "wall_seconds": time.perf_counter() - t_start,
        # CPU time of this process (all its threads): what the run costs on an idle machine
        "cpu_seconds": time.process_time() - cpu_start,
        "resumed_from_round": out.resumed_from,
        "load_avg_1min_start": load_start,
        "load_avg_1min_end": os.getloadavg()[0],
        "threads": job.config.threads,
        "device": job.config.device,
        "source_sha256": source_fingerprint(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(d / "summary.json", summary)
    for leftover in ("checkpoint.npz", "error.txt"):  # keep a committed folder small
        with contextlib.suppress(FileNotFoundError):
            (d / leftover).unlink()
    return JobResult(job.key, "done", summary=summary)


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
        """``load_min``, ``load_mean``, ``load_max`` and ``load_samples`` so far."""
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
    #: versions and CPU (:func:`fedquant.tools.report.environment`)
    environment: Row = field(default_factory=dict)
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
    jobs: Sequence[GridJob],
    raw_root: str | os.PathLike[str],
    execute: Execute,
    *,
    n_jobs: int = 1,
    in_process: bool = False,
    on_result: Callable[[JobResult, int, int], None] | None = None,
    argv: Sequence[str] = (),
    sample_interval: float = 30.0,
    rerun_outdated: bool = True,
) -> list[JobResult]:
    """Run every unfinished, non-alias job of ``jobs`` with :func:`run_job`.

    Parameters
    ----------
    jobs : sequence of GridJob
    raw_root : path
        The grid's raw-results folder.
    execute : callable
        What runs one job (see :func:`run_job`).
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
    raw = Path(raw_root)
    raw.mkdir(parents=True, exist_ok=True)
    ignore = raw / ".gitignore"
    if not ignore.exists():  # what a running or killed job leaves is not for committing
        ignore.write_text(_GITIGNORE)
    current = source_fingerprint() if rerun_outdated else None
    pending = [j for j in jobs if j.alias_of is None and job_status(j, raw, current) != "done"]
    threads = max((j.config.threads for j in jobs), default=0)
    env = environment()
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
        source_commit=env.pop("commit"),
        environment=env,
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

    def done(job: GridJob, r: JobResult | BaseException) -> None:
        if isinstance(r, BrokenProcessPool):
            r = JobResult(job.key, "failed", error=f"worker process died: {r}")
        elif isinstance(r, BaseException):  # pragma: no cover - run_job catches its own errors
            r = JobResult(job.key, "failed", error=f"{type(r).__name__}: {r}")
        results.append(r)
        if on_result is not None:
            on_result(r, len(results), len(pending))

    one = functools.partial(run_job, raw_root=raw, execute=execute, rerun_outdated=rerun_outdated)
    sampler = LoadSampler(sample_interval, on_sample=save)
    try:
        with _sigterm_as_interrupt(), sampler:
            if in_process or not pending:
                for j in pending:
                    done(j, one(j))
            else:
                run_in_processes(one, pending, workers=n_jobs, threads=threads, on_done=done)
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


def run_in_processes(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    threads: int = 0,
    on_done: Callable[[T, R | BaseException], None],
) -> None:
    """``fn(item)`` for every item in ``workers`` ``spawn``ed processes, as they finish.

    Parameters
    ----------
    fn : callable
        A module-level function (workers import it); its items and results
        must pickle.
    items : sequence
    workers : int
        Worker processes (at least 1); each runs items one after another.
    threads : int, default 0
        Threads per worker (``OMP_NUM_THREADS``, ``NUMBA_NUM_THREADS``, unless
        set); 0 leaves the libraries' defaults.
    on_done : callable
        ``on_done(item, result)`` in this process, in completion order;
        ``result`` is the exception ``fn`` raised, if it did.

    Notes
    -----
    Workers ignore Ctrl-C; an interrupt (or any exception of ``on_done``)
    terminates them before it propagates.
    """
    ex = ProcessPoolExecutor(
        max_workers=max(1, workers),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_ignore_sigint,
    )
    with _child_env(threads):  # workers are spawned on demand, by submit()
        futures: dict[Future[R], T] = {ex.submit(fn, item): item for item in items}
    try:
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    result: R | BaseException = f.result()
                except Exception as e:
                    result = e
                on_done(futures[f], result)
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


# --------------------------------------------------------------------------- one call, fresh


def call_in_fresh_process(
    target: str, kwargs: Mapping[str, Any], *, timeout_s: float, failed: str
) -> tuple[Any, str]:
    """``module.function(**kwargs)`` in a new Python process: (its JSON result, its stderr).

    Parameters
    ----------
    target : str
        ``"package.module:function"``; the function returns something JSON can
        encode and may print progress to stderr.
    kwargs : mapping
        JSON-encodable keyword arguments.
    timeout_s : float
        Seconds before the child is killed (:class:`subprocess.TimeoutExpired`).
    failed : str
        Start of the error message if the child fails.

    Raises
    ------
    FedquantError
        The child exited with an error: ``failed`` followed by the end of its stderr.
    """
    module, function = target.split(":")
    code = (
        "import importlib, json, sys\n"
        f"fn = getattr(importlib.import_module({module!r}), {function!r})\n"
        "print(json.dumps(fn(**json.loads(sys.argv[1]))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(dict(kwargs))],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise FedquantError(f"{failed}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr
