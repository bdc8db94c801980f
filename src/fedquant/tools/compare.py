"""``fedquant compare``: overlay and tabulate the metrics of several runs.

The arithmetic (grouping runs by configuration, mean and spread over seeds,
plots and CSVs) is :func:`fedquant.fl.compare.compare`; this is its command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from fedquant.argparsing import Parser

__all__ = ["main"]


def build_parser(prog: str) -> Parser:
    """The options of ``fedquant compare``."""
    p = Parser(
        prog=prog,
        description="Overlay a metric of several runs against rounds and against uplink bytes, "
        "print a summary table, and write the plots and CSVs. Runs whose config.toml differ "
        "only in the seed are one configuration: mean and standard deviation over seeds.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="results directories of fedquant run, or folders of them (fedquant run --out)",
    )
    p.add_argument(
        "--metric",
        default="accuracy",
        help="the evaluated metric, test_<METRIC> in metrics.jsonl (default: accuracy)",
    )
    p.add_argument(
        "--out",
        default="fedquant-compare",
        metavar="DIR",
        help="where to write the plots and CSVs (default: ./fedquant-compare)",
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str = "fedquant compare") -> int:
    """Entry point of ``fedquant compare``; returns the exit status."""
    from rich.console import Console
    from rich.table import Table

    from fedquant.fl.compare import compare

    args = build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    result = compare(args.runs, args.out, metric=args.metric)
    rows = result.table()
    direction = "lower" if result.lower_is_better else "higher"
    t = Table(title=f"{prog}: {result.metric} ({direction} is better)")
    for col in rows[0]:
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for row in rows:
        t.add_row(*row.values())
    Console().print(t)
    print(f"plots and CSVs: {Path(args.out)}")
    return 0
