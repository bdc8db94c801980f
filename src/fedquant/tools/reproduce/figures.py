"""The report's figures: accuracy against rounds and uplink bytes, final accuracy per cell."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.fl.files import atomic_write
from fedquant.tools.reproduce.claims import BEYOND
from fedquant.tools.reproduce.results import CellResults, Collected, stat, unaliased

__all__ = ["PANELS", "plot_curves", "plot_final"]

#: figure panels: title -> cells (cells in no panel go to a last "other cells" panel).
PANELS: dict[str, tuple[str, ...]] = {
    "rounding and clipping (claims b, c)": (
        "fp32-fedavg",
        "base",
        "nearest",
        "maxabs",
        "maxabs-nearest",
        "bits2",
        "bits2-nearest",
    ),
    "bits (claim a)": ("fp32-fedavg", "bits8", "bits4", "bits4224", "bits3", "bits2"),
    "aggregation and Dirichlet(0.5) (claims a, b, d)": (
        "fp32-fedavg",
        "base",
        "fedavg",
        "dir-fp32-fedavg",
        "dir-base",
        "dir-fedavg",
        "dir-nearest",
    ),
    "OCTAV coefficient: ours vs the paper's": (
        "base",
        "octav-paper",
        "bits2",
        "octav-paper-bits2",
    ),
    "beyond the paper": (
        "base",
        "bits2",
        *(a for a, _, _ in BEYOND),
    ),
}


def _curve(cr: CellResults, xkey: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sd over seeds of the per-round test accuracy against ``xkey``."""
    per_round: dict[int, list[tuple[float, float]]] = {}
    for run in cr.runs.values():
        for row in run.metrics:
            if row.get("test_accuracy") is None:
                continue
            per_round.setdefault(int(row["round"]), []).append(
                (float(row[xkey]), 100.0 * float(row["test_accuracy"]))
            )
    n = len(cr.runs)
    rounds = sorted(r for r, v in per_round.items() if len(v) == n)
    x = np.array([np.mean([p[0] for p in per_round[r]]) for r in rounds])
    y = np.array([np.mean([p[1] for p in per_round[r]]) for r in rounds])
    sd = np.array([np.std([p[1] for p in per_round[r]]) for r in rounds])
    return x, y, sd


def _panels(c: Collected, ds: str) -> list[tuple[str, list[CellResults]]]:
    present = [cr for (d, _), cr in c.cells.items() if d == ds and cr.runs]
    placed: set[str] = set()
    out = []
    for title, names in PANELS.items():
        crs = [cr for name in unaliased(c, ds, names) for cr in present if cr.cell == name]
        placed.update(names)
        if crs:
            out.append((title, crs))
    rest = [cr for cr in present if cr.cell not in placed]
    if rest:
        out.append(("other cells", rest))
    return out


def _style(c: Collected, cell: str) -> tuple[Any, str]:
    """(colour, line style) of a cell, the same in every panel: FP32 references dashed grey."""
    if cell == "fp32-fedavg":
        return "black", "--"
    if cell == "dir-fp32-fedavg":
        return "grey", "--"
    names = [x.name for x in c.grid.cells if not x.name.endswith("fp32-fedavg")]
    i = names.index(cell) if cell in names else len(names)
    return _plt().get_cmap("tab10")(i % 10), ("-", "-.", ":")[(i // 10) % 3]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_write(path) as f:
        fig.savefig(f, format="png")


def plot_curves(c: Collected, ds: str, out: Path, xkey: str) -> Path | None:
    """2x2 panels of mean test accuracy (± sd band) against rounds or cumulative uplink MB."""
    panels = _panels(c, ds)
    if not panels:
        return None
    plt = _plt()
    cols = 2
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 4.0 * nrows), dpi=100, squeeze=False)
    test_n = c.scale.test_samples
    per_round = f"{test_n}-image test subset" if test_n else "test split"
    for ax, (title, crs) in zip(axes.flat, panels, strict=False):
        for cr in crs:
            x, y, sd = _curve(cr, "round" if xkey == "round" else "cum_uplink_bytes")
            if x.size == 0:
                continue
            if xkey != "round":
                x = x / 1e6
            name = cr.cell + (f" (= {cr.alias_of})" if cr.alias_of else "")
            color, style = _style(c, cr.cell)
            ax.plot(x, y, style, color=color, marker="o", ms=2.5, lw=1.2, label=name)
            if len(cr.runs) > 1:
                ax.fill_between(x, y - sd, y + sd, color=color, alpha=0.12, lw=0)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        if xkey == "round":
            ax.set_xlabel("round")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("cumulative uplink, all clients (MB, measured payload bytes)")
        ax.set_ylabel(f"accuracy (%) on {per_round}")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    what = "round" if xkey == "round" else "cumulative uplink traffic"
    fig.suptitle(
        f"{c.title(ds)}: test accuracy vs {what} — mean ± sd over seeds, scale {c.scale.name}",
        fontsize=11,
    )
    fig.tight_layout()
    path = out / f"{ds}-accuracy-vs-{'round' if xkey == 'round' else 'uplink'}.png"
    _save(fig, path)
    plt.close(fig)
    return path


def plot_final(c: Collected, ds: str, out: Path) -> Path | None:
    """Horizontal bars: final accuracy (whole test split) ± sd for every cell."""
    crs = [cr for (d, _), cr in c.cells.items() if d == ds and cr.acc()]
    if not crs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(crs) + 1.4), dpi=100)
    stats = [stat(cr.acc().values()) for cr in crs]
    ys = np.arange(len(crs))[::-1]
    ax.barh(
        ys,
        [s.mean for s in stats],
        xerr=[0 if s.n < 2 else s.sd for s in stats],
        color=["#888888" if cr.cell.endswith("fp32-fedavg") else "#4c72b0" for cr in crs],
        capsize=2,
    )
    ax.set_yticks(ys, [cr.cell + (f" (= {cr.alias_of})" if cr.alias_of else "") for cr in crs])
    lo = min(s.mean for s in stats)
    hi = max(s.mean + (0 if s.n < 2 else s.sd) for s in stats)
    ax.set_xlim(max(0.0, lo - 0.3 * (hi - lo) - 1), hi + 0.5)
    ref = c.get(ds, "fp32-fedavg")
    if ref is not None:
        ax.axvline(stat(ref.acc().values()).mean, color="k", lw=0.8, ls="--", label="FP32 FedAvg")
        ax.legend(fontsize=8, loc="lower right")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("final test accuracy (%), whole test split, mean ± sd over seeds")
    ax.set_title(f"{c.title(ds)}: final accuracy per cell, scale {c.scale.name}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out / f"{ds}-final-accuracy.png"
    _save(fig, path)
    plt.close(fig)
    return path
