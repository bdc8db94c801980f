"""Planning a scale before running it: its cost, and the interval half-widths it buys.

Both come from a finished scale's raw results (the *reference*, e.g. the
committed ``small`` scale):

* **cost**: per data set, CPU seconds per training image-epoch, per client
  upload (encode + decode + aggregation), per evaluated test image and per
  final-evaluation image, fitted as means over the reference's runs of the
  claim cells; a new scale's runs are then priced by their numbers of
  images, client-rounds and evaluations. The result is an estimate of CPU
  time on an idle machine like the reference's, not a measurement.
* **half-widths**: for each comparison the claims count, the reference's sd of
  the paired per-seed differences, and with ``n`` seeds the half-width of the
  ``1 - 2 alpha`` interval and of the interval at Holm's strictest level
  (``alpha / family``). The sd at a new scale is not the reference's (more
  data and rounds usually shrink it): the figures are what the reference's
  variance would give.

``fedquant reproduce --scale NAME --plan [--plan-from REF]`` prints both.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedquant.tools.reproduce.grid import Grid, Job, expand
from fedquant.tools.reproduce.stats import half_width

__all__ = ["CostModel", "fit_cost", "plan_text", "run_cost"]


@dataclass(frozen=True)
class CostModel:
    """CPU seconds per unit of work, for one data set."""

    per_train_image: float
    per_client_round: float
    per_eval_image: float
    per_final_image: float
    runs: int


def fit_cost(collected: object) -> dict[str, CostModel]:
    """Per data set :class:`CostModel` from a reference's finished runs of the claim cells."""
    from fedquant.tools.reproduce.claims import CLAIM_CELLS
    from fedquant.tools.reproduce.results import Collected

    assert isinstance(collected, Collected)
    out: dict[str, CostModel] = {}
    for ds in collected.datasets:
        tr, cr, ev, fi = [], [], [], []
        for (d, cell), res in collected.cells.items():
            if d != ds or cell not in CLAIM_CELLS or res.alias_of is not None:
                continue
            job = next(j for j in collected.jobs if j.dataset == ds and j.cell == cell)
            cfg = job.config
            for run in res.runs.values():
                s = run.summary
                rounds = int(s["rounds"])
                tr.append(float(s["seconds_train"]) / (int(s["train_samples"]) * rounds))
                cr.append(float(s["seconds_codec"]) / (cfg.num_clients * rounds))
                evals = sum(1 for m in run.metrics if m.get("test_accuracy") is not None)
                ev.append(
                    float(s["seconds_eval"]) / max(1, evals * int(s["test_samples_per_round"]))
                )
                fi.append(
                    float(s.get("seconds_final_eval", 0.0))
                    / max(1, int(s["final_accuracy_test_samples"]))
                )
        if tr:
            out[ds] = CostModel(
                statistics.fmean(tr),
                statistics.fmean(cr),
                statistics.fmean(ev),
                statistics.fmean(fi),
                len(tr),
            )
    return out


#: training and test images of each data set in full (what ``samples_per_client = 0`` means)
FULL_SIZES = {
    "mnist-embedded": (4_000, 1_000),
    "fashion-mnist": (60_000, 10_000),
    "cifar10-jpeg": (50_000, 10_000),
}


def run_cost(job: Job, model: CostModel) -> float:
    """Estimated CPU seconds of one run."""
    cfg = job.config
    train_full, test_full = FULL_SIZES[job.dataset]
    train = (
        min(train_full, job.samples_per_client * cfg.num_clients)
        if job.samples_per_client
        else train_full
    )
    per_round_test = min(test_full, job.test_samples) if job.test_samples else test_full
    clients = max(1, round(cfg.num_clients * cfg.client_fraction))
    evals = math.ceil(cfg.rounds / max(1, cfg.eval_every))
    final = test_full if per_round_test < test_full else 0
    return (
        model.per_train_image * train * cfg.epochs * cfg.rounds
        + model.per_client_round * clients * cfg.rounds
        + model.per_eval_image * per_round_test * evals
        + model.per_final_image * final
    )


def plan_text(
    grid: Grid,
    scale: str,
    reference: str,
    raw: str | Path,
    *,
    cores: int = 2,
    data_dir: str | None = None,
) -> str:
    """Markdown: the claim grid's estimated cost at ``scale`` and the half-widths it buys."""
    from fedquant.tools.reproduce.claims import CLAIM_CELLS, evaluate_claims
    from fedquant.tools.reproduce.results import collect

    ref = collect(grid, reference, raw, data_dir=data_dir)
    models = fit_cost(ref)
    jobs = [
        j
        for j in expand(grid, scale, data_dir=data_dir, cells=list(CLAIM_CELLS))
        if j.alias_of is None
    ]
    seeds = len(grid.scale(scale).seeds)
    lines = [
        f"Scale `{scale}`, claim cells only ({len(CLAIM_CELLS)} cells; aliases not rerun): "
        f"{len(jobs)} runs ({seeds} seeds). Costs fitted on the `{reference}` scale's "
        f"finished runs ({', '.join(f'{d} {m.runs}' for d, m in models.items())} runs).",
        "",
        "| data set | runs | CPU s per run (estimate) | CPU min |",
        "|---|---|---|---|",
    ]
    total = 0.0
    for ds in dict.fromkeys(j.dataset for j in jobs):
        if ds not in models:
            lines.append(f"| {ds} | — | no reference runs | — |")
            continue
        costs = [run_cost(j, models[ds]) for j in jobs if j.dataset == ds]
        total += sum(costs)
        lines.append(
            f"| {ds} | {len(costs)} | {statistics.fmean(costs):.0f} | {sum(costs) / 60:.1f} |"
        )
    lines += [
        "",
        f"Total: **{total / 60:.0f} CPU min**, i.e. about **{total / 60 / cores:.0f} min** on "
        f"{cores} idle cores with `--jobs {cores}` (one thread per run), plus start-up.",
        "",
    ]
    claims = evaluate_claims(ref)
    alpha = ref.alpha
    tests = [
        r.tested
        for res in claims
        if res.key in ("a", "b", "c", "d")
        for r in res.rows
        if r.counted and r.tested is not None and r.tested.n >= 2
    ]
    if not tests:
        return "\n".join([*lines, "No reference comparisons to size the intervals with."])
    family = 2 * len(tests)
    sds = [t.sd for t in tests]
    lines += [
        f"Interval half-widths (pp) at the `{reference}` scale's variance: median and largest "
        f"sd of the {len(tests)} counted paired comparisons of claims (a)–(d) "
        f"{statistics.median(sds):.2f} / {max(sds):.2f} pp. "
        f"`{100 * (1 - 2 * alpha):g} %` = the interval the verdicts show; `Holm` = at "
        f"Holm's strictest level α/{family} (what the first rejection needs).",
        "",
        "| seeds | median 90 % half-width | largest | median Holm half-width | largest | "
        "comparisons resolved at their reference means (Holm, strictest) |",
        "|---|---|---|---|---|---|",
    ]
    for n in _seed_counts(seeds):
        hw = [half_width(sd, n, alpha) for sd in sds]
        hs = [half_width(sd, n, alpha / family) for sd in sds]
        resolved = sum(h < _distance(t) for h, t in zip(hs, tests, strict=True) if math.isfinite(h))
        lines.append(
            f"| {n}{' (this scale)' if n == seeds else ''} | {statistics.median(hw):.2f} | "
            f"{max(hw):.2f} | {statistics.median(hs):.2f} | {max(hs):.2f} | "
            f"{resolved} of {len(tests)} |"
        )
    return "\n".join(lines)


def _distance(t: object) -> float:
    from fedquant.tools.reproduce.stats import Tested
    from fedquant.tools.reproduce.stats import _distance as dist

    assert isinstance(t, Tested)
    return dist(t.mean, t.hypothesis)


def _seed_counts(seeds: int) -> Sequence[int]:
    return sorted({3, 5, seeds, 10, 20})
