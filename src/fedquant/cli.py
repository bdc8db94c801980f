"""The ``fedquant`` command: a thin layer over the library.

``fedquant run``        federated training with the paper's method (defaults: the
                       embedded MNIST subset, 10 IID clients, 4-2-2-4 bits,
                       stochastic rounding, OCTAV, inverse-MSE aggregation)
``fedquant bench``      benchmarks (quantization error, speed, federated)
``fedquant fuzz``       fuzz the payload decoder
``fedquant reproduce``  the paper-claims grid (see docs/results)
``fedquant compare``    overlay and tabulate the metrics of several runs

User errors (bad flags, bad config values, missing data) print one line naming
the option and the allowed values and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fedquant.errors import ConfigError, FedquantError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from fedquant.fl.config import FIELDS, default_of

    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with any of the options below (flags override it)",
    )
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in results directory DIR from its last checkpoint (takes DIR's config)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default = default_of(name)
        if f.kind is bool:
            p.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{f.help} (default: {'on' if default else 'off'})",
            )
        else:
            shown = "unset" if default is None else default
            p.add_argument(
                flag,
                dest=name,
                default=None,
                metavar="VALUE",
                help=f"{f.help}; {f.describe()} (default: {shown})",
            )


def _convert(name: str, raw: str) -> Any:
    from fedquant.fl.config import FIELDS

    f = FIELDS[name]
    try:
        if f.kind is int:
            return int(raw)
        if f.kind is float:
            return float(raw)
    except ValueError:
        raise ConfigError(
            "--" + name.replace("_", "-"), f"{raw!r} is not valid; expected {f.describe()}"
        ) from None
    return raw


def _resolve_config(args: argparse.Namespace) -> Any:
    from fedquant.fl.config import FIELDS, RunConfig
    from fedquant.fl.results import read_toml

    values: dict[str, Any] = {}
    if args.config:
        values.update(
            RunConfig.from_mapping(read_toml(Path(args.config)), source=args.config).to_dict()
        )
    given = {n: getattr(args, n) for n in FIELDS if getattr(args, n) is not None}
    for n, v in given.items():
        values[n] = v if isinstance(v, bool) else _convert(n, v)
    try:
        return RunConfig(**values), given
    except ConfigError as e:
        opt = e.option
        if opt in given:  # name the flag the user typed
            raise ConfigError("--" + opt.replace("_", "-"), str(e).split(": ", 1)[1]) from None
        raise


def cmd_run(args: argparse.Namespace) -> int:
    from fedquant.fl.results import ResultsDir
    from fedquant.fl.simulation import TIMING_KEYS, RunState, Simulation, final_accuracy

    if args.resume:
        rd = ResultsDir(Path(args.resume))
        given = [
            n
            for n in vars(args)
            if n not in ("cmd", "func", "resume", "quiet", "config")
            and getattr(args, n) is not None
        ]
        if given or args.config:
            raise ConfigError(
                "--resume",
                "takes the configuration from DIR/config.toml; do not combine it with other options",
            )
        if not (rd.path / "config.toml").exists():
            raise ConfigError(
                "--resume", f"{str(rd.path)!r} is not a fedquant results directory (no config.toml)"
            )
        cfg = rd.read_config()
        sim = Simulation(cfg)
        ck = rd.read_checkpoint()
        state = (
            sim.new_state()
            if ck is None
            else RunState(
                round=ck.round,
                global_state=ck.global_state,
                metrics=ck.metrics,
                residuals=ck.residuals,
            )
        )
    else:
        cfg, _ = _resolve_config(args)
        sim = Simulation(cfg)
        rd = ResultsDir.create(cfg.out, cfg)
        state = sim.new_state()
        rd.write_start(
            cfg,
            {
                "dataset": {
                    "name": sim.dataset.name,
                    "train": int(sim.dataset.train_y.size),
                    "test": int(sim.dataset.test_y.size),
                    "classes": list(sim.dataset.classes),
                },
                "float32_model_bytes": sim.reference.float32_nbytes,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        from fedquant.fl.results import write_json

        write_json(
            rd.path / "clients.json",
            {"label_counts": sim.label_counts.tolist(), "sizes": [int(p.size) for p in sim.parts]},
        )

    if not args.quiet:
        _print_plan(sim.uplink, sim.initial_state)
    title = f"{cfg.dataset}, {cfg.num_clients} clients, bits {cfg.bits}, {cfg.method}/{cfg.rounding}, {cfg.aggregation}"
    start = time.perf_counter()
    progress = None
    if not args.quiet:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )
        task = progress.add_task("", total=cfg.rounds, completed=state.round)
        progress.start()

    def on_round(st: RunState, row: dict[str, Any]) -> None:
        rd.write_round(st.round, st.global_state, st.metrics, residuals=st.residuals)
        if progress is not None:
            acc = final_accuracy(st.metrics)
            progress.update(
                task,
                completed=st.round,
                description=f"acc {100 * acc:5.1f}%  uplink {row['cum_uplink_bytes'] / 1e6:7.2f} MB",
            )

    try:
        state = sim.run(state, on_round=on_round)
    finally:
        if progress is not None:
            progress.stop()
    wall = time.perf_counter() - start
    m = state.metrics
    timing = {k: float(sum(r.get(k, 0.0) for r in m)) for k in TIMING_KEYS}
    last_up = next((r for r in reversed(m) if r["uplink_bytes"]), m[-1])
    summary = {
        "final_accuracy": final_accuracy(m),
        "best_accuracy": max(
            (r["test_accuracy"] for r in m if r.get("test_accuracy") is not None), default=math.nan
        ),
        "rounds": state.round,
        "uplink_bytes_per_client_round": last_up["uplink_bytes"]
        / max(1, last_up["clients_aggregated"]),
        "uplink_ratio_vs_float32": last_up["uplink_ratio"],
        "total_uplink_bytes": m[-1]["cum_uplink_bytes"],
        "total_downlink_bytes": m[-1]["cum_downlink_bytes"],
        "wall_seconds": wall,
        **{k: v for k, v in timing.items()},
        "results_dir": str(rd.path),
    }
    rd.write_summary(summary)
    rd.write_plots(m, title)
    if not args.quiet:
        _print_summary(cfg, summary)
    else:
        print(f"final accuracy {100 * summary['final_accuracy']:.2f}%  results: {rd.path}")
    return 0


def _print_summary(cfg: Any, s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fedquant run", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row(
        "data / clients",
        f"{cfg.dataset}, {cfg.num_clients} clients ({cfg.partition}), {s['rounds']} rounds",
    )
    t.add_row(
        "uplink", f"{cfg.bits} bits, {cfg.method}, {cfg.rounding} rounding, {cfg.granularity}"
    )
    t.add_row("aggregation", cfg.aggregation)
    t.add_row(
        "final / best accuracy",
        f"{100 * s['final_accuracy']:.2f}% / {100 * s['best_accuracy']:.2f}%",
    )
    t.add_row(
        "uplink per client-round",
        f"{s['uplink_bytes_per_client_round']:,.0f} bytes ({s['uplink_ratio_vs_float32']:.2f}x smaller than float32)",
    )
    t.add_row(
        "total uplink / downlink",
        f"{s['total_uplink_bytes'] / 1e6:.2f} MB / {s['total_downlink_bytes'] / 1e6:.2f} MB",
    )
    rnd = max(s["seconds_round"], 1e-9)
    t.add_row(
        "time",
        f"{s['wall_seconds']:.1f} s: training {100 * s['seconds_train'] / rnd:.1f}%, "
        f"codec+aggregation {100 * s['seconds_codec'] / rnd:.1f}%, evaluation {100 * s['seconds_eval'] / rnd:.1f}%",
    )
    t.add_row("results", s["results_dir"])
    Console().print(t)


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedquant.fl.compare import compare

    result = compare(args.runs, args.out, metric=args.metric)
    rows = result.table()
    direction = "lower" if result.lower_is_better else "higher"
    t = Table(title=f"fedquant compare: {result.metric} ({direction} is better)")
    for col in rows[0]:
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for row in rows:
        t.add_row(*row.values())
    Console().print(t)
    print(f"plots and CSVs: {Path(args.out)}")
    return 0


def _print_plan(spec: Any, state: Any) -> None:
    """How each tensor of a client's upload travels (bits, bytes), before the first round."""
    print(f"uplink per client and round, bits {spec.describe_bits()}:\n{spec.plan(state)}")


def _delegate(module: str, argv: Sequence[str], prog: str) -> int:
    import importlib
    import inspect

    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError("command", f"this installation lacks {module} ({e})") from None
    if "prog" in inspect.signature(mod.main).parameters:
        return int(mod.main(list(argv), prog=prog))
    return int(mod.main(list(argv)))


def build_parser() -> argparse.ArgumentParser:
    from fedquant import __version__

    parser = _Parser(prog="fedquant", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"fedquant {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="federated training with clipped uniform quantization",
        description="Federated training with clipped uniform quantization (arXiv 2405.13365). "
        "With no options: embedded MNIST subset, 10 IID clients, the paper's CNN, 4-2-2-4 bits, "
        "stochastic rounding, OCTAV clipping, inverse-MSE aggregation.",
    )
    _add_run_options(run)
    run.set_defaults(func=cmd_run)
    cmp = sub.add_parser(
        "compare",
        help="overlay and tabulate the metrics of several results directories",
        description="Overlay a metric of several runs against rounds and against uplink bytes, "
        "print a summary table, and write the plots and CSVs. Runs whose config.toml differ "
        "only in the seed are one configuration: mean and standard deviation over seeds.",
    )
    cmp.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="results directories of fedquant run, or folders of them (fedquant run --out)",
    )
    cmp.add_argument(
        "--metric",
        default="accuracy",
        help="the evaluated metric, test_<METRIC> in metrics.jsonl (default: accuracy)",
    )
    cmp.add_argument(
        "--out",
        default="fedquant-compare",
        metavar="DIR",
        help="where to write the plots and CSVs (default: ./fedquant-compare)",
    )
    cmp.set_defaults(func=cmd_compare)
    for name, module, helptext in (
        ("bench", "fedquant.bench.cli", "benchmarks: quantization error, speed, federated traffic"),
        ("fuzz", "fedquant.fuzz", "fuzz the payload decoder and the server's ingest path"),
        ("reproduce", "fedquant.reproduce", "run the paper-claims grid and write the report"),
        (
            "robustness",
            "fedquant.reproduce.robustness",
            "run the attack x aggregation-rule grid and write the robustness table",
        ),
    ):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.set_defaults(module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in ("bench", "fuzz", "reproduce", "robustness"):
        args, _ = parser.parse_known_args(argv[:1])
        try:
            return _delegate(args.module, argv[1:], f"fedquant {argv[0]}")
        except FedquantError as e:
            print(f"fedquant {argv[0]}: error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fedquant: %(levelname)s: %(message)s")
    try:
        return int(args.func(args))
    except FedquantError as e:
        print(f"fedquant {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
