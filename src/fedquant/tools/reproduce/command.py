"""``fedquant reproduce``: run a scale of the paper-claims grid, then write its report.

Examples
--------
The whole small grid on two cores (two worker processes, one torch thread
each), then the report under ``docs/results/claims-small/``::

    fedquant reproduce --scale small --jobs 2

Rerunning the same command skips finished runs and resumes interrupted ones
(runs computed by another fedquant source are rerun unless ``--keep-outdated``);
several such commands may share a grid (a lock file per run). The report alone::

    fedquant reproduce --scale small --report-only

Before running a bigger scale, its estimated CPU time and the interval
half-widths its seeds buy, from the finished small scale::

    fedquant reproduce --scale medium --plan --jobs 2
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedquant.argparsing import Parser
from fedquant.errors import ConfigError

DEFAULT_OUT = Path("docs") / "results"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"


def _claims_report(grid: Any, scale: str, out: Path, data_dir: str) -> Path:
    from fedquant.tools.reproduce.report import write_report

    return write_report(grid, scale, out, data_dir=data_dir)


@dataclass(frozen=True)
class Experiment:
    """A named grid run by this command: its file, report folder and report writer."""

    command: str  # the fedquant subcommand
    grid_file: Path  # relative to the repository root
    prefix: str  # reports go to OUT/<prefix>-<scale>/
    description: str
    scale_help: str
    report: Callable[[Any, str, Path, str], Path]  # (grid, scale, folder, data_dir) -> page


CLAIMS = Experiment(
    command="reproduce",
    grid_file=Path("experiments") / "paper-claims.toml",
    prefix="claims",
    description="Run the named grid of experiments/paper-claims.toml at one scale "
    "(resumable; finished runs are skipped) and write a Markdown + PNG report of which "
    "claims of arXiv 2405.13365 hold.",
    scale_help="a [scales.*] table of the grid: small, medium, paper (the paper's settings) "
    "or tiny (a smoke test); --plan estimates what a scale costs (default: small)",
    report=_claims_report,
)


def scale_dir(out: str | os.PathLike[str], scale: str, prefix: str = CLAIMS.prefix) -> Path:
    """Where a scale's report goes; its raw results are in ``raw/`` below it."""
    return Path(out) / f"{prefix}-{scale}"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a comma-separated list of integers"
        ) from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: expected integers >= 0")
    return seeds


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: expected an integer >= 0")
    return n


def build_parser(experiment: Experiment = CLAIMS, prog: str | None = None) -> Parser:
    """The options of ``fedquant reproduce`` (or of another ``experiment``'s command)."""
    p = Parser(prog=prog or f"fedquant {experiment.command}", description=experiment.description)
    p.add_argument("--scale", default="small", help=experiment.scale_help)
    p.add_argument(
        "--grid", metavar="FILE", help=f"the grid file (default: {experiment.grid_file})"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=str(DEFAULT_OUT),
        help=f"report folder; the scale's report is DIR/{experiment.prefix}-SCALE/, raw "
        f"results in its raw/ (default: {DEFAULT_OUT})",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default=os.environ.get("FEDQUANT_DATA", str(DEFAULT_DATA_DIR)),
        help="folder holding the data sets' files named in the grid "
        f"(default: $FEDQUANT_DATA or {DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--cache-dir", metavar="DIR", help="decoded data set cache (default: fedquant's)"
    )
    p.add_argument(
        "--jobs",
        type=_positive,
        default=1,
        metavar="N",
        help="worker processes running cells in parallel; 0 = in this process (default: 1)",
    )
    p.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help="torch threads per run (default: the scale's, else cores / --jobs with --jobs > 1, "
        "else torch's default)",
    )
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), help="torch device (default: cpu)")
    p.add_argument("--datasets", type=_csv, metavar="A,B", help="only these data sets")
    p.add_argument("--cells", type=_csv, metavar="A,B", help="only these cells")
    p.add_argument("--seeds", type=_seeds, metavar="0,1,2", help="instead of the scale's seeds")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true", help="only write the report")
    mode.add_argument("--no-report", action="store_true", help="only run, no report")
    mode.add_argument("--list", action="store_true", help="list the runs and their status")
    mode.add_argument(
        "--plan",
        action="store_true",
        help="run nothing: print the claim grid's estimated CPU time at --scale and the "
        "interval half-widths its seeds buy, from the finished runs of --plan-from",
    )
    p.add_argument(
        "--plan-from",
        metavar="SCALE",
        default="small",
        help="the finished scale whose run times and variances --plan uses (default: small)",
    )
    p.add_argument(
        "--keep-outdated",
        action="store_true",
        help="do not rerun finished runs computed by another fedquant source (the report "
        "then marks them OUTDATED); by default they are rerun",
    )
    p.add_argument("--quiet", action="store_true", help="no line per finished run")
    return p


def _command_line(args: argparse.Namespace, experiment: Experiment = CLAIMS) -> str:
    """The canonical command for the report: what a user types to get the same grid."""
    parts = ["fedquant", experiment.command, "--scale", args.scale]
    if args.grid:
        parts += ["--grid", args.grid]
    if args.out != str(DEFAULT_OUT):
        parts += ["--out", args.out]
    if args.data_dir != str(DEFAULT_DATA_DIR):
        parts += ["--data-dir", args.data_dir]
    if args.jobs != 1:
        parts += ["--jobs", str(args.jobs)]
    for name in ("threads", "device"):
        if getattr(args, name) is not None:
            parts += [f"--{name}", str(getattr(args, name))]
    for name in ("datasets", "cells", "seeds"):
        if getattr(args, name):
            parts += [f"--{name}", ",".join(str(v) for v in getattr(args, name))]
    if args.keep_outdated:
        parts.append("--keep-outdated")
    return shlex.join(parts)


def _check_data(jobs: Sequence[Any], data_dir: str) -> None:
    missing = sorted(
        {
            (j.dataset, j.config.data_root)
            for j in jobs
            if j.config.data_root is not None and not Path(j.config.data_root).exists()
        }
    )
    if missing:
        what = "; ".join(f"{name}: {root}" for name, root in missing)
        raise ConfigError(
            "--data-dir",
            f"{data_dir!r} lacks the files of {what} (pass --data-dir DIR or set $FEDQUANT_DATA)",
        )


def _print_list(jobs: Sequence[Any], raw: Path) -> None:
    from fedquant.tools.runner import job_status, source_fingerprint

    counts: dict[str, int] = {}
    current = source_fingerprint()
    for j in jobs:
        st = job_status(j, raw, current)
        counts[st] = counts.get(st, 0) + 1
        extra = f" (= {j.alias_of})" if j.alias_of else ""
        print(f"{st:8s} {j.key}{extra}")
    print("total: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


def main(
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    *,
    experiment: Experiment = CLAIMS,
) -> int:
    """Entry point of ``fedquant reproduce`` (or of another ``experiment``); returns the exit
    status. ``prog`` names the command in messages (default: ``fedquant <command>``)."""
    from fedquant.tools.reproduce.grid import default_grid_path, expand, load_grid

    prog = prog or f"fedquant {experiment.command}"
    args = build_parser(experiment, prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    grid = load_grid(args.grid if args.grid else default_grid_path(experiment.grid_file))
    overrides: dict[str, Any] = {}
    if args.threads is not None:
        overrides["threads"] = args.threads
    elif args.jobs > 1 and "threads" not in grid.scale(args.scale).settings:
        overrides["threads"] = max(1, (os.cpu_count() or 1) // args.jobs)  # no oversubscription
    if args.device is not None:
        overrides["device"] = args.device
    if args.cache_dir is not None:
        overrides["cache_dir"] = args.cache_dir
    jobs = expand(
        grid,
        args.scale,
        data_dir=args.data_dir,
        datasets=args.datasets,
        cells=args.cells,
        seeds=args.seeds,
        overrides=overrides,
    )
    out = scale_dir(args.out, args.scale, experiment.prefix)
    raw = out / "raw"
    if args.list:
        _print_list(jobs, raw)
        return 0
    if args.plan:
        from fedquant.tools.reproduce.power import plan_text

        ref_raw = scale_dir(args.out, args.plan_from, experiment.prefix) / "raw"
        print(
            plan_text(
                grid,
                args.scale,
                args.plan_from,
                ref_raw,
                cores=max(args.jobs, 1) if args.jobs > 1 else os.cpu_count() or 1,
                data_dir=args.data_dir,
            )
        )
        return 0

    status = 0
    if not args.report_only:
        from fedquant.tools.reproduce.runner import run_jobs
        from fedquant.tools.runner import JobResult

        _check_data(jobs, args.data_dir)
        t0 = time.perf_counter()

        def on_result(r: JobResult, k: int, n: int) -> None:
            if args.quiet:
                return
            elapsed = time.perf_counter() - t0
            eta = elapsed / k * (n - k)
            what = (
                f"{100 * r.final_accuracy:6.2f}% in {r.seconds:5.0f} s"
                + (f" (resumed at round {r.resumed_from})" if r.resumed_from else "")
                if r.status == "done" and r.final_accuracy is not None
                else (r.error or "")
            )
            load = f" load {r.load_avg:.1f}" if r.load_avg is not None else ""
            print(
                f"[{k:4d}/{n}] {r.status:7s} {r.key}: {what}{load}  "
                f"elapsed {elapsed / 60:.1f} min, eta {eta / 60:.1f} min",
                flush=True,
            )

        try:
            results = run_jobs(
                jobs,
                raw,
                n_jobs=max(args.jobs, 1),
                in_process=args.jobs == 0,
                on_result=on_result,
                argv=[_command_line(args, experiment)],
                rerun_outdated=not args.keep_outdated,
            )
        except KeyboardInterrupt:
            print(
                f"{prog}: interrupted; rerun the same command to resume "
                f"({_command_line(args, experiment)})",
                file=sys.stderr,
            )
            return 130
        failed = [r for r in results if r.status == "failed"]
        for r in failed:
            print(f"{prog}: {r.key} failed: {r.error}", file=sys.stderr)
        if failed:
            status = 1
    if not args.no_report:
        path = experiment.report(grid, args.scale, out, args.data_dir)
        print(f"report: {path}")
    return status
