"""The tables of ``docs/text-task.md``: a workload grid's cells over seeds, and per-tensor errors.

Reads what ``fedquant reproduce --grid experiments/text-task.toml`` wrote (the
runs' ``summary.json``; nothing is recomputed) and prints Markdown::

    python -m fedquant.tools.reproduce.text_report --scale small

1. per cell: the task's headline metric (bits per character), next-character
   accuracy and uplink bytes, mean ± sample sd over seeds, and the paired
   difference to a reference cell (FP32, or the cell it changes one factor of)
   with its 95 % t-interval (:func:`fedquant.tools.reproduce.results.paired_diff`);
2. per tensor group (embeddings, attention, MLP, LayerNorm, biases): the
   relative quantization error ``||w - Q(w)||^2 / ||w||^2`` of the final FP32
   models' tensors at 2, 4 and 8 bits (``final_model_vnmse`` of the summaries,
   :func:`fedquant.tools.reproduce.runner.tensor_vnmse`).
"""

from __future__ import annotations

import fnmatch
import math
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from fedquant.argparsing import Parser
from fedquant.tools.report import table
from fedquant.tools.reproduce.command import scale_dir
from fedquant.tools.reproduce.grid import load_grid
from fedquant.tools.reproduce.results import CellResults, Collected, collect, paired_diff, stat

#: tensor group -> name patterns (first match wins), for the char transformer's state dict
TENSOR_GROUPS: dict[str, tuple[str, ...]] = {
    "token embedding (tied head)": ("tok_emb.weight",),
    "position embedding": ("pos_emb.weight",),
    "attention qkv": ("*.attn.qkv.weight",),
    "attention output": ("*.attn.proj.weight",),
    "MLP (fc, out)": ("*.fc.weight", "*.out.weight"),
    "LayerNorm gains": ("*ln*.weight",),
    "LayerNorm biases": ("*ln*.bias",),
    "linear biases": ("*.bias",),
}

#: cell -> the cell it is compared with (one factor changed)
REFERENCES: dict[str, str] = {
    "bits8": "fp32",
    "bits4": "fp32",
    "bits2": "fp32",
    "auto2": "bits2",
    "maxabs4": "bits4",
    "maxabs2": "bits2",
    "nearest4": "bits4",
    "nearest2": "bits2",
    "bits2-emb8": "bits2",
    "bits2-attn8": "bits2",
    "bits2-mlp8": "bits2",
    "bits4-ln4": "bits4",
}


def tensor_group(name: str) -> str:
    """The group of a tensor name (``"other"`` if no pattern matches)."""
    for group, patterns in TENSOR_GROUPS.items():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return group
    return "other"


def _values(cr: CellResults, key: str) -> dict[int, float]:
    out = {}
    for seed, run in cr.runs.items():
        v = run.summary.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[seed] = float(v)
    return out


def cell_table(c: Collected, dataset: str, metric: str = "bits_per_char") -> str:
    """Markdown: one row per cell with its metric, accuracy, uplink and paired difference."""
    key = f"final_{metric}"
    higher = any(
        r.summary.get("higher_is_better") is True
        for cr in c.cells.values()
        for r in cr.runs.values()
    )
    rows = []
    fp32 = c.get(dataset, "fp32")
    fp32_bytes = fp32.summary_value("uplink_bytes_per_client_round") if fp32 else None
    for cell in c.grid.cells:
        cr = c.get(dataset, cell.name)
        if cr is None:
            continue
        vals = _values(cr, key)
        acc = {s: 100 * v for s, v in _values(cr, "final_accuracy").items()}
        up = cr.summary_value("uplink_bytes_per_client_round")
        ratio = f"{fp32_bytes / up:.1f}x" if fp32_bytes and up else "—"
        ref = REFERENCES.get(cell.name)
        ref_cr = c.get(dataset, ref) if ref else None
        if ref_cr is not None:
            d = paired_diff(vals, _values(ref_cr, key))
            vs = (
                f"{d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}] vs {ref}"
                if d is not None and d.n >= 2
                else (f"{d.mean:+.3f} (1 seed) vs {ref}" if d is not None else "—")
            )
        else:
            vs = "—"
        rows.append(
            [
                f"`{cell.name}`: {cell.label}",
                stat(vals.values()).fmt(3),
                stat(acc.values()).fmt(1),
                f"{up:,.0f}" if up else "—",
                ratio,
                vs,
                str(len(vals)),
            ]
        )
    return table(
        [
            "cell",
            metric.replace("_", " ") + " (mean ± sd)",
            "accuracy % (mean ± sd)",
            "uplink bytes / client-round",
            "smaller than FP32",
            "paired difference [95 % CI]" + (" (+ = better)" if higher else " (+ = worse)"),
            "seeds",
        ],
        rows,
    )


def group_vnmse(summaries: Sequence[Mapping[str, object]]) -> dict[str, dict[str, float]]:
    """Mean vNMSE per tensor group and width over the summaries' ``final_model_vnmse``."""
    acc: dict[str, dict[str, list[float]]] = {}
    for s in summaries:
        table = s.get("final_model_vnmse")
        if not isinstance(table, Mapping):
            continue
        for bits, per_tensor in table.items():
            for name, v in per_tensor.items():
                acc.setdefault(tensor_group(name), {}).setdefault(str(bits), []).append(float(v))
    return {g: {b: float(np.mean(v)) for b, v in by_bits.items()} for g, by_bits in acc.items()}


def vnmse_table(c: Collected, dataset: str, cell: str = "fp32") -> str:
    """Markdown: per tensor group, the final models' vNMSE at each width (mean over tensors, seeds)."""
    cr = c.get(dataset, cell)
    if cr is None:
        return f"(no finished run of cell {cell!r})"
    groups = group_vnmse([r.summary for r in cr.runs.values()])
    widths = sorted({b for v in groups.values() for b in v}, key=int)
    order = [g for g in (*TENSOR_GROUPS, "other") if g in groups]
    rows = [[g, *(f"{groups[g].get(b, math.nan):.2e}" for b in widths)] for g in order]
    return table(["tensor group", *(f"vNMSE at {b} bits" for b in widths)], rows)


def allocated_bits(c: Collected, dataset: str, cell: str = "auto2") -> str:
    """Markdown: the widths ``bits="auto:B"`` gave each tensor group (mean over rounds, seeds)."""
    cr = c.get(dataset, cell)
    if cr is None:
        return f"(no finished run of cell {cell!r})"
    acc: dict[str, list[float]] = {}
    for run in cr.runs.values():
        for row in run.metrics:
            for name, bits in (row.get("bits") or {}).items():
                acc.setdefault(tensor_group(name), []).append(float(bits))
    order = [g for g in (*TENSOR_GROUPS, "other") if g in acc]
    rows = [[g, f"{np.mean(acc[g]):.2f}", f"{min(acc[g]):.2f}–{max(acc[g]):.2f}"] for g in order]
    return table(["tensor group", "mean bits", "range (per round, mean over clients)"], rows)


def _settings(c: Collected) -> str:
    s = dict(c.grid.defaults)
    s.update(c.scale.settings)
    cpu = [r.summary.get("cpu_seconds") for cr in c.cells.values() for r in cr.runs.values()]
    cpu_f = [float(x) for x in cpu if isinstance(x, (int, float))]
    runs = len(cpu_f)
    return (
        "settings: "
        + ", ".join(f"{k}={v}" for k, v in s.items())
        + f"; seeds {list(c.scale.seeds)}; {runs} runs, {sum(cpu_f) / 60:.1f} min of CPU in all"
        + (f" ({np.mean(cpu_f):.0f} s per run)" if cpu_f else "")
    )


def main(
    argv: Sequence[str] | None = None, prog: str = "python -m fedquant.tools.reproduce.text_report"
) -> int:
    """Print the Markdown tables of a workload grid's scale."""
    p = Parser(
        prog=prog,
        description="Tables of the text-task grid (experiments/text-task.toml) from its raw results.",
    )
    p.add_argument("--grid", default="experiments/text-task.toml", help="the grid file")
    p.add_argument("--scale", default="small", help="the scale (default: small)")
    p.add_argument(
        "--out", default="docs/results/text", help="the --out given to fedquant reproduce"
    )
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    grid = load_grid(args.grid)
    raw = scale_dir(args.out, args.scale) / "raw"
    c = collect(grid, args.scale, raw)
    for ds in c.datasets:
        print(f"## {c.title(ds)} ({ds})\n")
        print(cell_table(c, ds) + "\n")
        print("Relative quantization error of the final FP32 models' tensors (OCTAV, nearest):\n")
        print(vnmse_table(c, ds) + "\n")
        print("Widths chosen by the `auto2` cell's allocator (per tensor group):\n")
        print(allocated_bits(c, ds) + "\n")
    print(_settings(c))
    missing = {k: len(v) for k, v in c.status.items() if k not in ("done", "alias")}
    if missing:
        print(f"\nnot finished: {missing}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
