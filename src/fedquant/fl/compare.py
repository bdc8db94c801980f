"""Compare finished runs: ``fedquant compare RUN_DIR...``.

Reads the results directories that ``fedquant run`` writes (``config.toml``
and ``metrics.jsonl``; see :mod:`fedquant.fl.results`), groups runs whose
configurations differ only in ``seed`` (and in where or on what they ran:
``out``, ``device``, ``threads``), and for each group

* overlays the task's metric (``test_<metric>`` in ``metrics.jsonl``; e.g.
  ``accuracy``, ``loss``, ``bits_per_char``) against rounds and against
  cumulative uplink bytes -- the mean over the group's runs, with a band of
  plus/minus one standard deviation when it has several seeds;
* summarizes the final and best value (mean ± sample standard deviation over
  seeds), the rounds and the uplink traffic.

Outputs, in the output directory: ``<metric>_vs_round.png``,
``<metric>_vs_uplink.png``, ``metrics.csv`` (one row per run and round),
``summary.csv`` (the table), and TensorBoard scalars under ``tensorboard/``
when ``torch.utils.tensorboard`` can be imported (``tensorboard`` is not a
dependency of fedquant).

Per round, a group's mean and spread are taken over the rounds that all of its
runs reached and evaluated.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.errors import ConfigError, DataError
from fedquant.fl.results import atomic_write, read_toml

#: configuration keys that do not change what a run computes (or that the group varies)
NOT_CONFIG = ("seed", "out", "device", "threads")
#: what names a configuration when all runs share one
HEADLINE = ("dataset", "model", "bits", "aggregation")
#: a metric whose name holds one of these is better when lower
LOWER_IS_BETTER = ("loss", "bits_per", "bpc", "perplexity", "error")


@dataclass(frozen=True)
class Run:
    """One results directory: its configuration and its per-round metrics."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


@dataclass(frozen=True)
class Curve:
    """One group's metric per round: mean and standard deviation over its runs."""

    rounds: np.ndarray
    uplink_bytes: np.ndarray  # cumulative, mean over runs
    mean: np.ndarray
    std: np.ndarray  # sample standard deviation (0 with one run)


@dataclass(frozen=True)
class Group:
    """Runs whose configurations differ only in :data:`NOT_CONFIG` keys."""

    label: str
    runs: list[Run]
    curve: Curve
    final: np.ndarray  # per run: the metric of its last evaluated round
    best: np.ndarray  # per run: its best evaluated value
    total_uplink: np.ndarray  # per run: cumulative uplink bytes at its last round


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` found and wrote."""

    metric: str
    groups: list[Group]
    files: list[Path]

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.metric)

    def summary(self) -> list[dict[str, Any]]:
        """The summary, one row per group, as numbers (``summary.csv``)."""
        rows = []
        for g in self.groups:
            row: dict[str, Any] = {"configuration": g.label, "runs": len(g.runs)}
            row["rounds"] = max(len(r.rows) for r in g.runs)
            for name, v in (("final", g.final), ("best", g.best)):
                row[f"{name}_{self.metric}_mean"] = float(np.mean(v))
                row[f"{name}_{self.metric}_sd"] = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
            row["total_uplink_bytes_mean"] = float(np.mean(g.total_uplink))
            rows.append(row)
        return rows

    def table(self) -> list[dict[str, str]]:
        """The summary, one row per group, as display strings."""
        return [
            {
                "configuration": g.label,
                "runs": str(len(g.runs)),
                "rounds": str(max(len(r.rows) for r in g.runs)),
                f"final {self.metric}": _mean_pm(g.final),
                f"best {self.metric}": _mean_pm(g.best),
                "uplink MB": _mean_pm(g.total_uplink / 1e6, digits=3),
            }
            for g in self.groups
        ]


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (losses, bits per character)."""
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def _mean_pm(values: np.ndarray, digits: int = 4) -> str:
    """``0.7340`` for one value, ``0.7340 ± 0.0120`` (sample standard deviation) for several."""
    if values.size == 0:
        return "-"
    mean = float(np.mean(values))
    if values.size == 1:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {float(np.std(values, ddof=1)):.2g}"


# ------------------------------------------------------------------ reading


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The results directories among ``paths``; a folder of runs stands for each run in it.

    ``fedquant run --out DIR`` writes its results into a new folder inside
    ``DIR``, so ``DIR`` itself may be given.
    """
    if not paths:
        raise ConfigError("RUN_DIR", "no results directories given; expected one or more")
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not str(raw).strip():
            raise ConfigError("RUN_DIR", "'' is not a directory; expected a results directory")
        if not p.exists():
            raise ConfigError("RUN_DIR", f"{str(p)!r} does not exist")
        if not p.is_dir():
            raise ConfigError("RUN_DIR", f"{str(p)!r} is not a directory")
        if (p / "config.toml").is_file():
            runs = [p]
        else:
            runs = sorted(c for c in p.iterdir() if c.is_dir() and (c / "config.toml").is_file())
        if not runs:
            raise ConfigError(
                "RUN_DIR",
                f"{str(p)!r} is not a fedquant results directory (no config.toml in it or in "
                "its sub-folders)",
            )
        found.extend(r for r in runs if r.resolve() not in {f.resolve() for f in found})
    return found


def load_run(path: Path) -> Run:
    """Read one results directory; :class:`DataError` names a missing or damaged file."""
    config = read_toml(path / "config.toml")
    metrics = path / "metrics.jsonl"
    try:
        text = metrics.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{str(metrics)!r} is missing: the run has not finished a round yet"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{str(metrics)!r} is unreadable: {e}") from None
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{str(metrics)!r}, line {i}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise DataError(f"{str(metrics)!r}, line {i}: expected an object with a 'round'")
        rows.append(row)
    if not rows:
        raise DataError(f"{str(metrics)!r} holds no rounds")
    return Run(path, config, rows)


def metric_key(runs: Sequence[Run], metric: str) -> str:
    """The ``metrics.jsonl`` key of ``metric``: ``test_<metric>``, or ``metric`` itself."""
    for key in (f"test_{metric}", metric):
        if all(any(_number(r.get(key)) for r in run.rows) for run in runs):
            return key
    seen = sorted(
        {
            k.removeprefix("test_")
            for run in runs
            for r in run.rows
            for k, v in r.items()
            if k.startswith("test_") and _number(v)
        }
    )
    missing = next(
        run.path for run in runs if not any(_number(r.get(f"test_{metric}")) for r in run.rows)
    )
    raise ConfigError(
        "--metric",
        f"{metric!r} is not recorded in {str(missing / 'metrics.jsonl')!r}; expected one of: "
        f"{', '.join(seen) or '(none evaluated)'}",
    )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------ grouping


def group_runs(runs: Sequence[Run], key: str, metric: str) -> list[Group]:
    """Runs grouped by configuration (ignoring :data:`NOT_CONFIG`), in the order given."""
    buckets: dict[str, list[Run]] = {}
    for run in runs:
        ident = json.dumps(
            {k: v for k, v in run.config.items() if k not in NOT_CONFIG}, sort_keys=True
        )
        buckets.setdefault(ident, []).append(run)
    configs = [json.loads(ident) for ident in buckets]
    varying = sorted({k for c in configs for k in c if any(c.get(k) != o.get(k) for o in configs)})
    higher = not lower_is_better(metric)
    groups = []
    for config, members in zip(configs, buckets.values(), strict=True):
        shown = varying or [k for k in HEADLINE if k in config]
        label = ", ".join(f"{k}={config[k]}" for k in shown if k in config)
        groups.append(_group(label or members[0].path.name, members, key, higher))
    return groups


def _group(label: str, runs: list[Run], key: str, higher: bool) -> Group:
    per_run = [
        {
            int(r["round"]): (float(r[key]), float(r.get("cum_uplink_bytes", 0)))
            for r in run.rows
            if _number(r.get(key))
        }
        for run in runs
    ]
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    values = np.array([[p[r][0] for r in common] for p in per_run]).reshape(len(runs), -1)
    uplink = np.array([[p[r][1] for r in common] for p in per_run]).reshape(len(runs), -1)
    std = np.std(values, axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(common))
    curve = Curve(np.array(common), uplink.mean(axis=0), values.mean(axis=0), std)
    last = [p[max(p)][0] for p in per_run]
    best = [(max if higher else min)(v for v, _ in p.values()) for p in per_run]
    total = [float(run.rows[-1].get("cum_uplink_bytes", 0)) for run in runs]
    return Group(label, runs, curve, np.array(last), np.array(best), np.array(total))


# ------------------------------------------------------------------ writing


def compare(
    paths: Sequence[str | Path], out: str | Path, *, metric: str = "accuracy"
) -> Comparison:
    """Read the runs under ``paths``, group them, write plots, CSVs (and TensorBoard scalars).

    Parameters
    ----------
    paths : sequence of path
        Results directories, or folders of them (``fedquant run --out``).
    out : path
        Where to write the outputs (created if missing).
    metric : str, default "accuracy"
        The evaluated metric to compare (``test_<metric>`` in ``metrics.jsonl``).

    Raises
    ------
    ConfigError
        A path is missing or not a results directory; the metric is not recorded.
    DataError
        A results directory's ``metrics.jsonl`` is missing or damaged.
    """
    runs = [load_run(p) for p in find_runs(paths)]
    key = metric_key(runs, metric)
    groups = group_runs(runs, key, metric)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{str(out)!r} is a file; expected a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("--out", f"cannot create {str(out)!r}: {e.strerror or e}") from None
    files = _write_plots(groups, metric, out)
    files.append(_write_metrics_csv(groups, key, metric, out))
    result = Comparison(metric, groups, files)
    files.append(_write_csv(out / "summary.csv", result.summary()))
    files.extend(_write_tensorboard(groups, key, metric, out))
    return result


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())
    return path


def _write_metrics_csv(groups: list[Group], key: str, metric: str, out: Path) -> Path:
    rows = [
        {
            "configuration": g.label,
            "run": str(run.path),
            "seed": run.seed,
            "round": r["round"],
            "cum_uplink_bytes": r.get("cum_uplink_bytes"),
            metric: r.get(key),
        }
        for g in groups
        for run in g.runs
        for r in run.rows
    ]
    return _write_csv(out / "metrics.csv", rows)


def _write_plots(groups: list[Group], metric: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, xlabel in (
        (f"{metric}_vs_round.png", "round"),
        (f"{metric}_vs_uplink.png", "cumulative uplink traffic (MB, measured payload bytes)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for g in groups:
            c = g.curve
            xs = c.rounds if xlabel == "round" else c.uplink_bytes / 1e6
            n = len(g.runs)
            (line,) = ax.plot(xs, c.mean, marker="o", ms=3, label=f"{g.label} (n={n})")
            if n > 1:
                ax.fill_between(
                    xs, c.mean - c.std, c.mean + c.std, alpha=0.2, color=line.get_color()
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(
            f"test {metric}"
            + (" (mean ± sd over seeds)" if any(len(g.runs) > 1 for g in groups) else "")
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_write(out / name) as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        paths.append(out / name)
    return paths


def _write_tensorboard(groups: list[Group], key: str, metric: str, out: Path) -> list[Path]:
    """One TensorBoard run per results directory, if ``torch.utils.tensorboard`` imports."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return []
    root = out / "tensorboard"
    for g in groups:
        for run in g.runs:
            with SummaryWriter(log_dir=str(root / _safe(g.label) / run.path.name)) as w:
                for r in run.rows:
                    if _number(r.get(key)):
                        w.add_scalar(f"{metric}/by_round", r[key], int(r["round"]))
                        w.add_scalar(
                            f"{metric}/by_uplink_bytes", r[key], int(r.get("cum_uplink_bytes", 0))
                        )
    return [root]


def _safe(label: str) -> str:
    """A label as one path component."""
    return "".join(ch if ch.isalnum() or ch in "-_.=," else "_" for ch in label)[:120] or "run"
