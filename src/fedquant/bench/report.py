"""Writers of the benchmark results: one JSON file and one Markdown report.

The JSON (``bench.json``) holds every row measured, with the command, the
environment and the sizes used; the Markdown (``bench.md``) is generated
from it alone (:func:`markdown`), so a report can be re-rendered from a
stored JSON without re-running anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA = 1
Row = Mapping[str, Any]


def fmt(v: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; ``-`` for missing values."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        if v == 0.0:
            return "0"
        return f"{v:.{digits}g}"
    return str(v)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


#: significant digits kept in the JSON (measurements are not more precise than this)
JSON_DIGITS = 7


def _rounded(o: Any) -> Any:
    if isinstance(o, float) and math.isfinite(o) and o != 0.0:
        return float(f"{o:.{JSON_DIGITS}g}")
    if isinstance(o, Mapping):
        return {k: _rounded(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_rounded(v) for v in o]
    return o


def write_json(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``results`` as JSON, one table row per line, floats to 7 significant digits
    (NaN/Inf refused: they are not JSON)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(_dumps(_rounded(_plain(results)), 0) + "\n")
    return p


def _plain(o: Any) -> Any:
    """Numpy scalars and arrays to Python values (recursively)."""
    if isinstance(o, Mapping):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if not isinstance(o, (str, int, float, bool, type(None))):
        return _default(o)
    return o


def _dumps(o: Any, depth: int) -> str:
    """Indented JSON down to the rows; each row (a dict of scalars) on one line."""
    flat = json.dumps(o, allow_nan=False, separators=(", ", ": "))
    scalar = (str, int, float, bool, type(None))
    if not isinstance(o, (dict, list)) or (
        isinstance(o, dict) and all(isinstance(v, scalar) for v in o.values())
    ):
        return flat
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(o, dict):
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in o.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}" if items else "{}"
    if all(isinstance(v, scalar) for v in o):
        return flat
    items = [inner + _dumps(v, depth + 1) for v in o]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]" if items else "[]"


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy arrays and scalars
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _scheme_label(r: Row) -> str:
    if r["scheme"] == "fedquant":
        gran = f", {r['granularity']}" if r.get("granularity") == "channel" else ""
        return f"fedquant {r['method']} ({r['rounding']}{gran})"
    return str(r["scheme"])


def _bits_table(rows: Sequence[Row], bits: Sequence[int], *, show_bpc: bool = True) -> str:
    """Rows = scheme, columns = bit widths, cells = NMSE (and bits/coord where it differs)."""
    order: list[str] = []
    cells: dict[tuple[str, int], str] = {}
    for r in rows:
        label = _scheme_label(r)
        if label not in order:
            order.append(label)
        cell = fmt(r["nmse"])
        bpc = r.get("bpc")
        if show_bpc and bpc is not None and abs(bpc - r["bits"]) > 0.05 * r["bits"]:
            cell += f" ({bpc:.2f} b)"
        cells[label, r["bits"]] = cell
    return table(
        ["scheme"] + [f"B={b}" for b in bits],
        ([lab] + [cells.get((lab, b), "") for b in bits] for lab in order),
    )


# --------------------------------------------------------------------------- sections


def _grid_md(sec: Mapping[str, Any]) -> list[str]:
    rows = sec["rows"]
    bits = sorted({r["bits"] for r in rows})
    out = [
        "## 1. The level grid and OCTAV's noise coefficient",
        "",
        "OCTAV's threshold (converged fixed point on the density) for each grid x rounding x "
        "coefficient, its exact NMSE, and the excess over the best threshold for that same grid "
        "and rounding. `L = 2^B - 1`. Cells: `NMSE (excess)`; the Monte-Carlo check "
        f"(fedquant's `threshold` + `quantize` on {sec['n']:,} seeded samples) is in the JSON "
        "(`mc_nmse`, `mc_s`). The OCTAV paper's coefficient `4^-B/3` belongs to the midrise "
        "grid; on the `+-s` grid of fedquant and of the paper's reference code it is too small.",
        "",
    ]
    for src in dict.fromkeys(r["source"] for r in rows):
        rs = [r for r in rows if r["source"] == src]
        out.append(f"**{src}**")
        out.append("")
        body = []
        for case in dict.fromkeys(r["case"] for r in rs):
            cr = {r["bits"]: r for r in rs if r["case"] == case}
            first = next(iter(cr.values()))
            body.append(
                [first["description"]]
                + [
                    f"{fmt(cr[b]['nmse_octav'])} ({100 * cr[b]['excess']:+.1f}%)" if b in cr else ""
                    for b in bits
                ]
            )
        out.append(table(["grid, rounding, c"] + [f"B={b}" for b in bits], body))
        out.append("")
        sr = {(r["case"], r["bits"]): r for r in rs}
        body = [
            [r0["description"]] + [fmt(sr[r0["case"], b]["s_octav"], 3) for b in bits]
            for r0 in (sr[c, bits[0]] for c in dict.fromkeys(r["case"] for r in rs))
        ]
        out.append(
            "<details><summary>OCTAV thresholds s/σ</summary>\n\n"
            + table(["case"] + [f"B={b}" for b in bits], body)
            + "\n\n</details>"
        )
        out.append("")
    return out


def _error_md(sec: Mapping[str, Any]) -> list[str]:
    syn = sec["synthetic"]
    bits = sorted({r["bits"] for r in syn}) if syn else []
    out = [
        "## 2. Quantization error (NMSE = MSE / variance)",
        "",
        f"Synthetic sources: {sec['n']:,} seeded samples, unit variance. fedquant is per tensor. "
        "Peers at the bit widths they have; `(x b)` = actual bits per coordinate when it "
        "differs from B by more than 5 % (side information, padding). Limits in closed form: "
        "`best-uniform-*` = best threshold on fedquant's grid; `lloyd-max` = optimal "
        "non-uniform quantizer; `rate-distortion` = `4^-B` for the Gaussian, Shannon's lower "
        "bound for the others.",
        "",
    ]
    for src in dict.fromkeys(r["source"] for r in syn):
        rs = [r for r in syn if r["source"] == src]
        out += [f"### {src}", "", _bits_table(rs, bits), ""]
    for model, m in sec.get("models", {}).items():
        info = m.get("train")
        out.append(f"### {model}: real weights, per layer")
        out.append("")
        if info:
            out.append(
                f"The paper's CNN **trained centrally** (not federated) on `{info['dataset']}` for "
                f"{info['epochs']} epoch(s), seed {info['seed']}: test accuracy "
                f"{100 * info['test_accuracy']:.1f} %. Layers: "
                + ", ".join(f"`{k}` ({v:,})" for k, v in m["layers"].items())
                + ". Whole-model NMSE = sum of per-layer MSE x size / sum of variance x size. "
                "Limits are exact on each layer's values (symmetric best uniform; unconstrained "
                "1-D k-means for Lloyd-Max); `rate-distortion` is the Gaussian `4^-B`, a "
                "reference only."
            )
        elif m.get("source"):
            out.append(f"Weights from `{m['source']}`.")
        out.append("")
        tb = sorted({r["bits"] for r in m["total"]})
        out += [_bits_table(m["total"], tb), ""]
        per = [
            r
            for r in m["rows"]
            if (
                r["scheme"] == "fedquant"
                and r["method"] == "octav"
                and r["granularity"] == "tensor"
            )
            or r["scheme"].startswith("best-uniform")
            or r["scheme"] == "lloyd-max"
        ]
        body = []
        for src in dict.fromkeys(r["source"] for r in per):
            labels = dict.fromkeys(_scheme_label(r) for r in per if r["source"] == src)
            for lab in labels:
                cells = {
                    r["bits"]: fmt(r["nmse"])
                    for r in per
                    if r["source"] == src and _scheme_label(r) == lab
                }
                body.append([src.split("/", 1)[1], lab] + [cells.get(b, "") for b in tb])
        out.append(
            "<details><summary>per layer: OCTAV vs the limits</summary>\n\n"
            + table(["layer", "scheme"] + [f"B={b}" for b in tb], body)
            + "\n\n</details>"
        )
        out.append("")
    if sec.get("skipped"):
        out += ["Skipped: " + "; ".join(sec["skipped"]), ""]
    return out


def _speed_md(sec: Mapping[str, Any]) -> list[str]:
    out = [
        "## 3. Speed",
        "",
        f"{sec['n']:,}-element float32 tensor. `ratio` = t(memcpy) / t(op), medians of the "
        "per-rep ratios with memcpy (`np.copyto`, preallocated) timed right before each rep in "
        "the same process; for 1 thread, in parentheses, the same ratio of process CPU "
        "times: what the wall ratio would be on an idle core. "
        "Higher is better; 1.0 = as fast as copying the tensor. "
        f"memcpy measured {fmt(sec.get('memcpy_gbps_median'), 3)} GB/s (read + write, median); "
        f"load average before / after: {sec.get('load_before', '-')} / {sec.get('load_after', '-')}.",
        "",
    ]
    fq = sec["fedquant"]
    ths = sorted({r["threads"] for r in fq})
    ops = list(
        dict.fromkeys((r["op"], r["bits"], r["rounding"]) for r in fq if r["op"] != "threshold")
    )
    by = {(r["op"], r["bits"], r["rounding"], r["threads"]): r for r in fq}

    def cell(r: Row) -> str:
        cpu = r.get("cpu_ratio_memcpy")
        return fmt(r["ratio_memcpy"], 3) + (
            f" (cpu {fmt(cpu, 3)})" if cpu and r.get("threads") == 1 else ""
        )

    body = []
    for op, b, rnd in ops:
        body.append(
            [f"`{op}`", b, rnd]
            + [cell(by[op, b, rnd, t]) if (op, b, rnd, t) in by else "" for t in ths]
            + [fmt(by[op, b, rnd, ths[-1]]["melem_per_s"], 4)]
        )
    out.append(
        table(
            ["op", "B", "rounding"] + [f"ratio, {t} thread(s)" for t in ths] + ["M elem/s (all)"],
            body,
        )
    )
    out.append("")
    thr = [r for r in fq if r["op"] == "threshold"]
    if thr:
        out.append(
            table(
                [
                    "OCTAV threshold",
                    "threads",
                    "x memcpy",
                    "x np.abs(x).sum()",
                    "x torch abs().sum()",
                ],
                (
                    [
                        "`threshold(x, 4, 'stochastic')`",
                        r["threads"],
                        fmt(1.0 / r["ratio_memcpy"], 3),
                        fmt(r.get("x_abs_sum_numpy"), 3),
                        fmt(r.get("x_abs_sum_torch"), 3),
                    ]
                    for r in thr
                ),
            )
        )
        out.append("")
    if sec.get("peers"):
        out.append(
            "Peers (NumPy reference implementations from `fedquant.bench.peers`, not tuned; "
            "`torch-qint8` is PyTorch's fused C++ quantizer), 1 thread:"
        )
        out.append("")
        out.append(
            table(
                ["peer", "op", "B", "ratio", "M elem/s"],
                (
                    [r["impl"], r["op"], r["bits"], cell(r), fmt(r["melem_per_s"], 4)]
                    for r in sec["peers"]
                ),
            )
        )
        out.append("")
    if sec.get("device"):
        dev = sec["device"]
        out.append(
            f"Torch implementation of the same quantizer on `{dev[0]['device']}` "
            "(fedquant's kernels are CPU code), ratio to `Tensor.copy_` there:"
        )
        out.append("")
        out.append(
            table(
                ["op", "B", "rounding", "ratio", "M elem/s"],
                (
                    [f"`{r['op']}`", r["bits"], r["rounding"], cell(r), fmt(r["melem_per_s"], 4)]
                    for r in dev
                ),
            )
        )
        out.append("")
    return out


def headline(results: Mapping[str, Any]) -> list[str]:
    """A few bullet points computed from the results (the figures for the README)."""
    out: list[str] = []
    sec = results.get("sections", {})
    sp = sec.get("speed")
    if sp:
        fq = sp["fedquant"]
        top = max(r["threads"] for r in fq)
        for op, what in (
            ("kernel(scale=s)", "quantize + pack kernel, given threshold, preallocated output"),
            ("quantize(scale=s)", "`quantize(x, B, scale=s)` (allocates its output)"),
            ("encode", "full `encode` incl. the OCTAV threshold"),
            ("decode", "`decode`"),
        ):
            cells = []
            for b in sorted({r["bits"] for r in fq if r["op"] == op}):
                rr = {
                    r["threads"]: r
                    for r in fq
                    if r["op"] == op and r["bits"] == b and r["rounding"] == "stochastic"
                }
                med = " / ".join(f"{fmt(rr[t]['ratio_memcpy'], 2)}x" for t in sorted(rr))
                cpu = rr[min(rr)].get("cpu_ratio_memcpy") if rr else None
                cells.append(f"{b} bits {med} (1 thread, CPU time: {fmt(cpu, 2)}x)")
            out.append(
                f"- {what}, stochastic rounding, {sp['n']:,} floats, 1 / {top} threads: "
                + "; ".join(cells)
                + " of memcpy"
            )
        for r in fq:
            if r["op"] == "threshold" and r["threads"] == top:
                out.append(
                    f"- OCTAV threshold: {fmt(r.get('x_abs_sum_numpy'), 2)}x the time of one "
                    f"`np.abs(x).sum()` ({fmt(r.get('x_abs_sum_torch'), 2)}x torch `x.abs().sum()`, "
                    f"{fmt(1.0 / r['ratio_memcpy'], 2)}x a memcpy)"
                )
    er = sec.get("error")
    if er and er.get("synthetic"):
        g = {
            (r["scheme"], r["method"], r["rounding"], r["bits"]): r["nmse"]
            for r in er["synthetic"]
            if r["source"] == "gaussian"
        }
        bits = sorted({k[3] for k in g})
        oc = [g.get(("fedquant", "octav", "stochastic", b)) for b in bits]
        lim = [g.get(("best-uniform-stochastic", "", "", b)) for b in bits]
        if all(v is not None for v in oc + lim):
            out.append(
                "- Gaussian NMSE, OCTAV + stochastic rounding at B = "
                + "/".join(map(str, bits))
                + ": "
                + " / ".join(fmt(v, 3) for v in oc)
                + " (best stochastic uniform quantizer: "
                + " / ".join(fmt(v, 3) for v in lim)
                + ")"
            )
    return out


#: rows of the error tables that are fedquant options previewed, not peers
PREVIEWS = ("hadamard-octav",)


def _error_rows(results: Mapping[str, Any]) -> list[Row]:
    er = results.get("sections", {}).get("error")
    if not er:
        return []
    rows = list(er.get("synthetic", []))
    for m in er.get("models", {}).values():
        rows += m["total"]
    return rows


def _octav_best(rows: Sequence[Row]) -> dict[tuple[str, int], float]:
    fed: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["scheme"] == "fedquant" and r["method"] == "octav" and r["granularity"] == "tensor":
            k = (r["source"], r["bits"])
            fed[k] = min(fed.get(k, math.inf), r["nmse"])
    return fed


def peer_wins(results: Mapping[str, Any]) -> list[str]:
    """Where a peer has lower NMSE than fedquant's OCTAV (best of the two roundings, per
    tensor) at the same nominal bits -- stated in the report, not hidden."""
    rows = _error_rows(results)
    fed = _octav_best(rows)
    names = set(results.get("peers", [])) - set(PREVIEWS)
    out = []
    for r in rows:
        if r["scheme"] in names and (r["source"], r["bits"]) in fed:
            f = fed[r["source"], r["bits"]]
            if r["nmse"] < f:
                out.append(
                    f"- {r['source']}, B={r['bits']}: `{r['scheme']}` {fmt(r['nmse'])} "
                    f"({r['bpc']:.2f} bits/coord) < fedquant OCTAV {fmt(f)}"
                )
    return out


def peer_speed_wins(results: Mapping[str, Any]) -> list[str]:
    """Peers whose encode or decode is faster than fedquant's public ``quantize(scale=s)`` /
    ``dequantize`` at the same bits (either rounding), both on one thread, compared by the
    CPU-time ratio to memcpy (the figure least disturbed by other processes)."""
    sp = results.get("sections", {}).get("speed")
    if not sp or not sp.get("peers"):
        return []
    ours: dict[tuple[str, int], float] = {}
    for r in sp["fedquant"]:
        kind = {"quantize(scale=s)": "encode", "dequantize": "decode"}.get(r["op"])
        v = r.get("cpu_ratio_memcpy")
        if kind and r["threads"] == 1 and v:
            ours[kind, r["bits"]] = max(ours.get((kind, r["bits"]), 0.0), v)
    out = []
    for r in sp["peers"]:
        mine = ours.get((r["op"], r["bits"]))
        v = r.get("cpu_ratio_memcpy")
        if mine is not None and v and r["threads"] == 1 and v > mine:
            what = "quantize(scale=s)" if r["op"] == "encode" else "dequantize"
            out.append(
                f"- {r['impl']} {r['op']} at {r['bits']} bits: {fmt(v, 3)}x memcpy "
                f"> fedquant `{what}` {fmt(mine, 3)}x (1 thread, CPU time)"
            )
    return out


def preview_gains(results: Mapping[str, Any]) -> list[str]:
    """NMSE of per-tensor OCTAV with stochastic rounding over that of each previewed option
    (also stochastic), per source and bits; > 1 means the preview is better."""
    rows = _error_rows(results)
    ref = {
        (r["source"], r["bits"]): r["nmse"]
        for r in rows
        if r["scheme"] == "fedquant"
        and r["method"] == "octav"
        and r["rounding"] == "stochastic"
        and r["granularity"] == "tensor"
    }
    out = []
    for name in PREVIEWS:
        cells: dict[str, list[str]] = {}
        for r in rows:
            k = (r["source"], r["bits"])
            if r["scheme"] == name and k in ref and r["nmse"] > 0:
                extra = (
                    f" at {r['bpc']:.2f} b" if abs(r["bpc"] - r["bits"]) > 0.05 * r["bits"] else ""
                )
                cells.setdefault(r["source"], []).append(
                    f"B={r['bits']} {ref[k] / r['nmse']:.2g}x{extra}"
                )
        for src, cs in cells.items():
            out.append(f"- {src}: NMSE of OCTAV (stochastic) / `{name}` = " + ", ".join(cs))
    return out


NOTES = """- **Real weights are from centrally trained models** (the paper's CNN, a few epochs, seeded),
  standing in for federated ones; federated runs are part 3 of issue 6 (section 4).
- The **peers** are NumPy reference implementations written from their papers
  (`fedquant.bench.peers`): faithful in error, not tuned for speed. `torch-qint8`
  (PyTorch's fused C++ kernel, nearest rounding, 8 bits) is the tuned speed peer.
- `hadamard-octav` is a **preview** of a "beyond the paper" option (randomized Hadamard
  rotation, then fedquant's OCTAV quantizer), not a peer and not yet a fedquant option.
- **Timing** on a shared 2-core VM: every figure is a ratio to a memcpy measured in the same
  process, rep by rep, median of the per-rep ratios; other processes still disturb the
  2-thread rows most (the load average is recorded with the speed table).
- **Student-t(3)** has no fourth moment: sample NMSEs at 8 bits move by 3x between seeds
  (0.011-0.034 for per-tensor OCTAV over seeds 0-5, 2^20 samples); the closed forms are the
  stable reference.
- QSGD with one norm at 2 bits: each draw's error comes from ~800 coordinates rounded up to
  the full norm, so a single draw scatters by ~3.5 %; its expectation on a 2^20 Gaussian is
  `||x||_1/||x||_2 - 1` = 816.
"""


def markdown(results: Mapping[str, Any]) -> str:
    """The whole report as Markdown, generated from the results dictionary."""
    env = results.get("environment", {})
    out = [
        "# fedquant benchmarks",
        "",
        "Generated by:",
        "",
        "```",
        results.get("command", "python -m fedquant.bench"),
        "```",
        "",
        f"{results.get('created', '')}; "
        + ", ".join(f"{k} {v}" for k, v in env.items())
        + (
            " — **quick smoke run, tiny sizes: not meaningful figures**"
            if results.get("quick")
            else ""
        ),
        "",
    ]
    head = headline(results)
    if head:
        out += ["## Headline", "", *head, ""]
    wins = peer_wins(results)
    if wins:
        out += ["## Where a peer wins (NMSE at equal nominal bits)", "", *wins, ""]
    fast = peer_speed_wins(results)
    if fast:
        out += ["## Where a peer is faster (same bits, 1 thread)", "", *fast, ""]
    prev = preview_gains(results)
    if prev:
        out += ["## Preview: rotation before OCTAV", "", *prev, ""]
    out += ["## Notes", "", NOTES]
    sec = results.get("sections", {})
    if sec.get("grid"):
        out += _grid_md(sec["grid"])
    if sec.get("error"):
        out += _error_md(sec["error"])
    if sec.get("speed"):
        out += _speed_md(sec["speed"])
    out += [
        "## 4. Federated benchmarks",
        "",
        "Part 3 of issue 6 (accuracy and traffic of federated runs) is not part of this "
        "report yet; its place is `fedquant.bench.federated`.",
        "",
    ]
    return "\n".join(out)


def write_markdown(results: Mapping[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(markdown(results))
    return p
