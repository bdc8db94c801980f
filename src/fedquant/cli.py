"""The ``fedquant`` command: a thin layer over the library.

``fedquant run``        federated training with the paper's method (defaults: the
                       embedded MNIST subset, 10 IID clients, 4-2-2-4 bits,
                       stochastic rounding, OCTAV, inverse-MSE aggregation)
``fedquant bench``      benchmarks (quantization error, speed, federated)
``fedquant fuzz``       fuzz the payload decoder
``fedquant reproduce``  the paper-claims grid (see docs/results)
``fedquant compare``    overlay and tabulate the metrics of several runs
``fedquant robustness`` the attack x aggregation-rule grid

Every command but ``run`` is a tool (:data:`TOOLS`): a module whose
``main(argv, prog) -> int`` parses its own options. User errors (bad flags, bad
config values, missing data) print one line naming the option and the allowed
values and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedquant.argparsing import EXIT_USER_ERROR, Parser
from fedquant.errors import ConfigError, FedquantError
from fedquant.optional import install_hint

#: subcommand -> (module, help); each module's ``main(argv, prog) -> int`` runs it
TOOLS = {
    "compare": (
        "fedquant.tools.compare",
        "overlay and tabulate the metrics of several results directories",
    ),
    "bench": (
        "fedquant.tools.bench.cli",
        "benchmarks: quantization error, speed, federated traffic",
    ),
    "fuzz": ("fedquant.tools.fuzz", "fuzz the payload decoder and the server's ingest path"),
    "reproduce": ("fedquant.tools.reproduce", "run the paper-claims grid and write the report"),
    "robustness": (
        "fedquant.tools.reproduce.robustness",
        "run the attack x aggregation-rule grid and write the robustness table",
    ),
}


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
    from fedquant.fl.config import FIELDS, RunConfig, flat_options, with_dataset_defaults
    from fedquant.fl.results import read_toml

    values: dict[str, Any] = {}
    if args.config == "":
        raise ConfigError("--config", "is empty; expected the path of a TOML file")
    if args.config is not None:
        values.update(
            flat_options(read_toml(Path(args.config), option="--config"), source=args.config)
        )
    given = {n: getattr(args, n) for n in FIELDS if getattr(args, n) is not None}
    for n, v in given.items():
        values[n] = v if isinstance(v, bool) else _convert(n, v)
    try:
        cfg = RunConfig(**with_dataset_defaults(values))
    except ConfigError as e:
        opt = e.option
        if opt in given:  # name the flag the user typed
            raise e.renamed("--" + opt.replace("_", "-")) from None
        raise
    # stored resolved, so the run's config.toml means the same from any directory
    paths = {
        n: str(Path(getattr(cfg, n)).expanduser().resolve())
        for n in ("data_root", "cache_dir")
        if getattr(cfg, n)
    }
    return cfg.with_(**paths), given


def _open_resume(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(results dir, simulation, state) of the run ``--resume DIR`` continues."""
    from fedquant.fl.results import ResultsDir
    from fedquant.fl.simulation import Simulation, restore_state

    if not args.resume:
        raise ConfigError("--resume", "is empty; expected a results directory of fedquant run")
    rd = ResultsDir(Path(args.resume), option="--resume")
    given = [
        n
        for n in vars(args)
        if n not in ("cmd", "func", "resume", "quiet", "config") and getattr(args, n) is not None
    ]
    if given or args.config is not None:
        raise ConfigError(
            "--resume",
            "takes the configuration from DIR/config.toml; do not combine it with other options",
        )
    if not (rd.path / "config.toml").is_file():
        raise ConfigError(
            "--resume", f"{str(rd.path)!r} is not a fedquant results directory (no config.toml)"
        )
    cfg = rd.read_config()
    ck = rd.read_checkpoint()
    if ck is not None:  # an edited config.toml is refused before any data is loaded
        rd.check_checkpoint(ck)
    sim = Simulation(cfg)
    return rd, sim, restore_state(sim, rd, ck)


def cmd_run(args: argparse.Namespace) -> int:
    from fedquant.fl.round import RoundRecord
    from fedquant.fl.simulation import (
        RunState,
        Simulation,
        create_results_dir,
        final_metric,
        run_to_dir,
    )

    if args.resume is not None:
        rd, sim, state = _open_resume(args)
        cfg = sim.cfg
        if state.round >= cfg.rounds and (rd.path / "summary.json").is_file():
            print(f"this run is complete ({state.round} rounds); nothing to do: {rd.path}")
            return 0
    else:
        cfg, _ = _resolve_config(args)
        sim = Simulation(cfg)
        rd = create_results_dir(sim, option="--out")
        state = sim.new_state()

    if not args.quiet:
        _print_plan(sim.uplink, sim.initial_state)
    metric = sim.task.metric
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

    def on_round(st: RunState, record: RoundRecord) -> None:
        if progress is not None:
            progress.update(
                task,
                completed=st.round,
                description=f"{_show_metric(metric, final_metric(st.metrics, metric))}  "
                f"uplink {record.cum_uplink_bytes / 1e6:7.2f} MB",
            )

    try:
        result = run_to_dir(sim, results=rd, state=state, on_round=on_round)
    finally:
        if progress is not None:
            progress.stop()
    summary = result.summary
    if not args.quiet:
        # a workload's own clients (e.g. one per package of a text corpus) are not a partition
        split = cfg.partition if sim.dataset is not None else "natural partition"
        _print_summary(cfg, summary, metric, split)
    else:
        print(f"final {_show_metric(metric, summary[f'final_{metric}'])}  results: {rd.path}")
    return 0


def _show_metric(metric: str, value: float) -> str:
    """``accuracy 97.12%`` or ``bits_per_char 2.3456``."""
    if metric == "accuracy":
        return f"accuracy {100 * value:.2f}%"
    return f"{metric} {value:.4f}"


def _print_summary(
    cfg: Any, s: dict[str, Any], metric: str = "accuracy", split: str | None = None
) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fedquant run", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row(
        "data / clients",
        f"{cfg.dataset}, {cfg.num_clients} clients ({split or cfg.partition}), {s['rounds']} rounds",
    )
    widths = f"client bits {cfg.client_bits}" if cfg.client_bits else f"{cfg.bits} bits"
    t.add_row("uplink", f"{widths}, {cfg.method}, {cfg.rounding} rounding, {cfg.granularity}")
    t.add_row(
        "aggregation",
        cfg.aggregation
        + (f", server optimizer {cfg.server_optimizer}" if cfg.server_optimizer != "none" else ""),
    )
    if metric == "accuracy":
        t.add_row(
            "final / best accuracy",
            f"{100 * s['final_accuracy']:.2f}% / {100 * s['best_accuracy']:.2f}%",
        )
    else:
        t.add_row(
            f"final / best {metric}", f"{s[f'final_{metric}']:.4f} / {s[f'best_{metric}']:.4f}"
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


def _print_plan(spec: Any, state: Any) -> None:
    """How each tensor of a client's upload travels (bits, bytes), before the first round."""
    print(f"uplink per client and round, bits {spec.describe_bits()}:\n{spec.plan(state)}")


def _delegate(module: str, argv: Sequence[str], prog: str) -> int:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and install_hint(e) is not None:
            raise  # main names the extra to install
        raise ConfigError("command", f"this installation lacks {module} ({e})") from None
    return int(mod.main(list(argv), prog))


def _missing_extra(cmd: str, e: ModuleNotFoundError) -> int:
    """One line naming the extra that provides a missing optional module (exit 2); re-raise
    any other missing module."""
    hint = install_hint(e)
    if hint is None:
        raise e
    print(f"fedquant {cmd}: error: {hint}", file=sys.stderr)
    return EXIT_USER_ERROR


def build_parser() -> argparse.ArgumentParser:
    from fedquant import __version__

    parser = Parser(prog="fedquant", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"fedquant {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    run = sub.add_parser(
        "run",
        help="federated training with clipped uniform quantization",
        description="Federated training with clipped uniform quantization (arXiv 2405.13365). "
        "With no options: embedded MNIST subset, 10 IID clients, the paper's CNN, 4-2-2-4 bits, "
        "stochastic rounding, OCTAV clipping, inverse-MSE aggregation.",
    )
    _add_run_options(run)
    run.set_defaults(func=cmd_run)
    for name, (module, helptext) in TOOLS.items():
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.set_defaults(module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in TOOLS:
        args, _ = parser.parse_known_args(argv[:1])
        try:
            return _delegate(args.module, argv[1:], f"fedquant {argv[0]}")
        except FedquantError as e:
            print(f"fedquant {argv[0]}: error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        except ModuleNotFoundError as e:
            return _missing_extra(argv[0], e)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fedquant: %(levelname)s: %(message)s")
    try:
        return int(args.func(args))
    except FedquantError as e:
        print(f"fedquant {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as e:
        return _missing_extra(args.cmd, e)
    except KeyboardInterrupt:
        print("fedquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
