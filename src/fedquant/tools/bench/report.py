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
    out += _speed_goals_md(fq)
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
            "Peers (NumPy reference implementations from `fedquant.tools.bench.peers`, not tuned; "
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
    if not sec.get("device"):
        out += [
            "No GPU rows: none was timed in this run (`--device cuda` adds the torch "
            "quantizer and fedquant's device path, `fedquant.quant.device`, against "
            "`Tensor.copy_` on the GPU).",
            "",
        ]
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


def _speed_goals_md(fq: Sequence[Row]) -> list[str]:
    """The speed goals (:data:`fedquant.tools.bench.speed.SPEED_GOALS`), met or the measured ratio."""
    from fedquant.tools.bench.speed import SPEED_GOALS, TORCH_QINT8_OP

    ths = sorted({r["threads"] for r in fq})
    body = []

    def verdict(r: Row | None, goal: float | None) -> str:
        if r is None or goal is None or r.get("ratio_memcpy") is None:
            return "-"
        v = r["ratio_memcpy"]
        cpu = r.get("cpu_ratio_memcpy") if r.get("threads") == 1 else None
        return f"{fmt(v, 3)} {'met' if v >= goal else 'not met'}" + (
            f" (cpu {fmt(cpu, 3)})" if cpu else ""
        )

    for what, op, bits, rnd, g1, g2 in SPEED_GOALS:
        keys = dict.fromkeys(
            (r["bits"], r["rounding"])
            for r in fq
            if r["op"] == op
            and (bits is None or r["bits"] == bits)
            and (rnd is None or r["rounding"] == rnd)
        )
        for b, rd in keys:
            rows = {
                r["threads"]: r for r in fq if (r["op"], r["bits"], r["rounding"]) == (op, b, rd)
            }
            body.append(
                [f"{what}, {b} bits {rd}".strip(), f">= {g1} / >= {g2}"]
                + [verdict(rows.get(t), g1 if t == 1 else g2) for t in ths]
            )
    for t in ths:  # 8-bit nearest encode against PyTorch's qint8 kernel, same thread count
        enc = next(
            (
                r
                for r in fq
                if (r["op"], r["bits"], r["rounding"], r["threads"]) == ("encode", 8, "nearest", t)
            ),
            None,
        )
        peer = next((r for r in fq if r["op"] == TORCH_QINT8_OP and r["threads"] == t), None)
        if enc and peer and peer.get("ratio_memcpy"):
            rel = enc["ratio_memcpy"] / peer["ratio_memcpy"]
            cells = ["-"] * len(ths)
            cells[ths.index(t)] = f"{fmt(rel, 3)}x qint8 {'met' if rel >= 1 else 'not met'}"
            body.append([f"8-bit nearest encode vs torch qint8 ({t} thread(s))", ">= 1x", *cells])
    if not body:
        return []
    return [
        "Goals (ratio to memcpy at 1 / all threads; 'met' when the measured wall-clock ratio "
        "reaches it; for 1 thread, in parentheses, the ratio of process CPU times):",
        "",
        table(["goal", "target"] + [f"{t} thread(s)" for t in ths], body),
        "",
    ]


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
    out += beyond_headline(results)
    return out


#: rows of the error tables that are not peers: ``hadamard-octav`` is the peers' reference
#: implementation of rotation + OCTAV (:mod:`fedquant.tools.bench.peers`), written before
#: ``QuantSpec(rotation=True)`` existed; section 5 measures the option itself
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


NOTES = """- **Real weights are from centrally trained models** (the paper's CNN, a few epochs, seeded),
  standing in for federated ones; federated runs are in section 4.
- The **peers** are NumPy reference implementations written from their papers
  (`fedquant.tools.bench.peers`): faithful in error, not tuned for speed. `torch-qint8`
  (PyTorch's fused C++ kernel, nearest rounding, 8 bits) is the tuned speed peer.
- `hadamard-octav` in section 2 is not a peer: it is the peers' NumPy reference of a
  randomized Hadamard rotation followed by fedquant's OCTAV (stochastic), kept as a cross-check.
  The rotation is a fedquant option, `QuantSpec(rotation=True)`, measured through the codec in
  section 5 with rANS coding (`entropy="rans"`) and adaptive bit allocation (`bits="auto:2.03"`).
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
        results.get("command", "python -m fedquant.tools.bench"),
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
    out += ["## Notes", "", NOTES]
    sec = results.get("sections", {})
    if sec.get("grid"):
        out += _grid_md(sec["grid"])
    if sec.get("error"):
        out += _error_md(sec["error"])
    if sec.get("speed"):
        out += _speed_md(sec["speed"])
    out += federated_markdown(sec.get("federated"))
    if sec.get("beyond"):
        out += beyond_markdown(sec["beyond"])
    return "\n".join(out)


# --------------------------------------------------------------------------- federated


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def _bytes(b: float | None) -> str:
    return "-" if b is None else f"{b:,.0f}"


def _bytes_md(bt: Mapping[str, Any]) -> list[str]:
    out = [
        "### 4.1 Uplink bytes to reach float32's accuracy minus one point",
        "",
        f"`{bt['dataset']}` ({bt['train_examples']:,} train / {bt['test_examples']:,} test "
        f"images), {bt['num_clients']} IID clients, {bt['rounds']} rounds, every round evaluated, "
        f"seeds {', '.join(map(str, bt['seeds']))} (each method runs once per seed). "
        f"**Target** of a run = the test accuracy of float32 FedAvg *with the same seed* (same "
        f"initial model, partition and mini-batch order) averaged over its last {bt['k']} "
        f"rounds, minus {100 * bt['margin']:.0f} point: "
        + ", ".join(f"seed {s} {100 * t:.2f} %" for s, t in bt.get("targets", {}).items())
        + " (the seeds differ by about as much as the margin, hence the pairing). "
        "Bytes to target = the summed lengths of the encoded payloads the server received up to "
        "and including the first round whose accuracy reaches the target (median over seeds; "
        "`-` unless every seed reached it). Quantized methods aggregate with inverse-MSE weights "
        "(the default), float32 with FedAvg.",
        "",
    ]
    body = []
    for r in bt["methods"]:
        body.append(
            [
                f"`{r['method']}`",
                _bytes(r["uplink_bytes_per_round"]),
                fmt(1.0 / r["per_round_vs_fp32"], 3) + "x" if r.get("per_round_vs_fp32") else "-",
                f"{r['reached']}/{r['seeds']}",
                ", ".join(
                    "-" if x is None else str(x) for x in r.get("rounds_to_target_per_seed", [])
                ),
                _bytes(r["bytes_to_target"]),
                fmt(r["fewer_bytes_than_fp32"], 3) + "x" if r.get("fewer_bytes_than_fp32") else "-",
                f"{100 * r['final_accuracy']:.1f} ({100 * r['final_accuracy_min']:.1f}-"
                f"{100 * r['final_accuracy_max']:.1f})",
            ]
        )
    out.append(
        table(
            [
                "method",
                "uplink B/round",
                "smaller per round",
                "seeds reaching target",
                "round reached, per seed",
                "uplink B to target",
                "fewer B than float32",
                "final accuracy % (min-max)",
            ],
            body,
        )
    )
    out.append("")
    missed = [r for r in bt["methods"] if r["reached"] < r["seeds"]]
    if missed:
        out.append(
            f"Not reached in {bt['rounds']} rounds by every seed: "
            + ", ".join(f"`{r['method']}` ({r['reached']}/{r['seeds']})" for r in missed)
            + "."
        )
        out.append("")
    if bt.get("skipped"):
        out += ["Left out: " + "; ".join(bt["skipped"]), ""]
    loads = [r.get("load_before") for r in bt.get("runs", []) if r.get("load_before") is not None]
    if loads:
        out += [
            f"Load average during the runs: {min(loads):.1f}-{max(loads):.1f} "
            f"(timings of these runs are in the JSON, not compared here).",
            "",
        ]
    return out


def _overhead_md(ov: Mapping[str, Any]) -> list[str]:
    st, al, mem = ov["steady"], ov["all"], ov["memory"]
    cfg = ov["config"]
    out = [
        "### 4.2 The simulator's overhead and memory (the default run)",
        "",
        f"`RunConfig()` with {cfg['rounds']} rounds: {cfg['num_clients']} clients, "
        f"`{cfg['bits']}` {cfg['rounding']}, {cfg['aggregation']}, "
        f"{ov['train_examples']:,} training images per round, {ov['threads']} torch threads. "
        + (
            "Run in a fresh Python process, as `fedquant run` starts one "
            "(`fedquant.tools.bench.federated.overhead_in_fresh_process`). "
            if ov.get("fresh_process")
            else ""
        )
        + "Time measured by wrapping the simulator's functions with timers in the same run "
        "(`fedquant.tools.bench.federated.timed_simulation`); after each round the checkpoint and "
        "metrics files are written as `fedquant run` writes them (fsynced, to a temporary "
        "directory) and counted in the round. **Overhead** = round wall time - local "
        "training - the evaluation's forward passes: encode, admission, decode + aggregate, "
        "the broadcast, loading models, data gathering, results files, bookkeeping. "
        "Evaluation of the global model is its own line and not counted as overhead. "
        f"Steady state = rounds {ov['warmup'] + 1}..{cfg['rounds']} (round 1 pays numba's "
        "compilation and torch's first calls); all rounds in the last column.",
        "",
    ]
    body = []
    for c in ("train", "evaluate", "encode", "admit", "aggregate", "broadcast", "load_state"):
        body.append(
            [c, fmt(st[c], 3), f"{100 * st[f'share_{c}']:.2f} %", f"{100 * al[f'share_{c}']:.2f} %"]
        )
    if "results" in st:  # benchmarks from before the results files were timed lack it
        body.append(
            [
                "results files (checkpoint, metrics.jsonl)",
                fmt(st["results"], 3),
                f"{100 * st['share_results']:.2f} %",
                f"{100 * al['share_results']:.2f} %",
            ]
        )
    body.append(
        [
            "other (sampling, data, metrics)",
            fmt(st["other"], 3),
            f"{100 * st['share_other']:.2f} %",
            f"{100 * al['share_other']:.2f} %",
        ]
    )
    body.append(
        [
            "**overhead** (all but train and evaluate)",
            fmt(st["non_training"], 3),
            f"**{100 * st['share_non_training']:.2f} %**",
            f"{100 * al['share_non_training']:.2f} %",
        ]
    )
    body.append(
        [
            "overhead + evaluation",
            fmt(st["non_training"] + st["evaluate"], 3),
            f"{100 * st['share_non_training_with_evaluate']:.2f} %",
            f"{100 * al['share_non_training_with_evaluate']:.2f} %",
        ]
    )
    body.append(["round (wall)", fmt(st["seconds_round"], 4), "100 %", "100 %"])
    out.append(table(["part", "seconds (steady)", "share (steady)", "share (all rounds)"], body))
    loads = [r["load"] for r in ov["rounds"] if r.get("load") is not None]
    out += [
        "",
        f"- Overhead share per round, median over steady rounds: "
        f"{100 * st['median_share_non_training']:.2f} %.",
        f"- The same split in process CPU time (all threads; not stretched by waiting for a "
        f"core): training {100 * st['cpu_share_train']:.1f} %, evaluation "
        f"{100 * st['cpu_share_evaluate']:.1f} %, **overhead "
        f"{100 * st['cpu_share_non_training']:.2f} %** ({st['cpu_non_training']:.2f} CPU s over "
        f"{st['rounds']} rounds).",
        f"- Training speed: {st['samples_per_s']:,.0f} samples/s ({ov['threads']} threads; "
        f"{st['samples']:,.0f} samples in {st['train']:.1f} s of `train_local`)"
        + (f"; load average {min(loads):.1f}-{max(loads):.1f} during the run." if loads else "."),
        f"- Memory: RSS {_mib(mem['rss_after_setup_round1'])} after round 1, "
        f"{_mib(mem['rss_end'])} after round {cfg['rounds']} (peak {_mib(mem['peak_rss'])}); "
        f"least-squares slope over rounds {ov['warmup'] + 1}..{cfg['rounds']}: "
        f"{mem['slope_bytes_per_round'] / 1024:+.1f} KiB/round (one float32 model: "
        f"{mem['model_float32_bytes'] / 1024:.0f} KiB). Single rounds' RSS moves by "
        "megabytes as the allocator keeps and returns transient buffers, so 30 rounds "
        "say little about growth: the long run below does.",
    ]
    mor = ov.get("memory_over_rounds")
    if mor:
        w, warm = mor["window"], mor["warmup"]
        out.append(
            f"- Memory over {mor['rounds']} rounds (fresh process, {mor['num_clients']} clients, "
            f"{mor['train_examples']:,} training images, checkpoint and metrics written every "
            f"round): RSS floor (smallest of {w} rounds) {_mib(mor['floor_first'])} at rounds "
            f"{warm + 1}-{warm + w}, {_mib(mor['floor_last'])} at rounds "
            f"{mor['rounds'] - w + 1}-{mor['rounds']}: "
            f"{mor['floor_growth_per_round'] / 1024:+.1f} KiB/round "
            f"({mor['floor_growth'] / 1024:+.0f} KiB in all; single rounds rise up to "
            f"{mor['max_minus_floor'] / 2**20:.1f} MiB above the floor and fall back): "
            + (
                "**flat** (under 1/20 of a float32 model per round: nothing model- or "
                "payload-sized is kept per round)."
                if mor["flat"]
                else "**not flat** (1/20 of a float32 model per round or more)."
            )
        )
    ts = ov.get("training_speed")
    if ts:
        out.append(
            "- Local training alone (`train_local`, one epoch over all "
            f"{ts[0]['samples']:,} images, median of {ts[0]['reps']} interleaved reps, "
            f"load average {ts[0]['load_before']}/{ts[-1]['load_after']}): "
            + "; ".join(
                f"{r['threads']} thread(s) {r['samples_per_s']:,.0f} samples/s (best "
                f"{r['best_samples_per_s']:,.0f}, {r['cpu_us_per_sample']:.0f} us CPU/sample)"
                for r in ts
            )
            + "."
        )
    mvc = ov.get("memory_vs_clients")
    if mvc:
        out += [
            "",
            "RSS of fresh processes simulating the same data split among more clients "
            f"({mvc[0]['rounds']} round(s) each): one model copy per client would add the last "
            "column.",
            "",
            table(
                [
                    "clients",
                    "RSS after data load",
                    "RSS after setup",
                    "RSS at end",
                    "peak",
                    "end - first row",
                    "a model per client would add",
                ],
                (
                    [
                        r["num_clients"],
                        _mib(r["rss_data"]),
                        _mib(r["rss_setup"]),
                        _mib(r["rss_end"]),
                        _mib(r["peak_rss"]),
                        f"{r['extra_vs_first'] / 2**20:+.1f} MiB",
                        _mib(r["model_copies_would_add"]),
                    ]
                    for r in mvc
                ),
            ),
        ]
    prof = ov.get("profile")
    if prof:
        out += [
            "",
            "<details><summary>cProfile of steady rounds: functions by own time</summary>\n",
            table(
                ["function", "calls", "own s", "cumulative s", "own share"],
                (
                    [
                        f"`{r['function']}`",
                        r["calls"],
                        fmt(r["tottime"], 3),
                        fmt(r["cumtime"], 3),
                        f"{100 * r['share']:.1f} %",
                    ]
                    for r in prof
                ),
            ),
            "\n</details>",
        ]
    out.append("")
    return out


def _flower_md(fl: Mapping[str, Any]) -> list[str]:
    out = [
        "### 4.3 The simulator vs Flower's simulation engine (Ray)",
        "",
    ]
    if fl.get("skipped"):
        return [*out, f"Skipped: {fl['skipped']}.", ""]
    ver = fl.get("versions", {})
    out += [
        f"The same run ({fl['num_clients']} clients, `{fl['bits']}`, {fl['aggregation']}, "
        f"{fl['train_examples']:,} training images, {fl['rounds']} rounds, central evaluation "
        "every round) through fedquant's simulator and through Flower's simulation engine "
        f"(flwr {ver.get('flwr', '?')}, ray {ver.get('ray', '?')}; `fedquant_mod` + "
        "`QuantizedFedAvg`, the simulator's client as the ClientApp), one after the other in one "
        "process. Flower's startup = from calling `run_simulation` to the first client starting "
        "to train; a round = between the ends of consecutive central evaluations; medians over "
        "rounds 2..N. Ratios > 1: Flower is slower.",
        "",
    ]
    body = []
    for r in fl["rows"]:
        if r.get("error"):
            body.append([r["runtime"], "failed: " + r["error"], "", "", "", "", "", "", ""])
            continue
        body.append(
            [
                r["runtime"],
                fmt(r["startup_s"], 3),
                fmt(r["round_median_s"], 3),
                fmt(r.get("round_vs_simulator"), 3),
                fmt(r["train_median_s"], 3),
                fmt(r["total_s"], 4),
                fmt(r.get("total_vs_simulator"), 3),
                f"{100 * r['final_accuracy']:.1f}"
                + (
                    f" (max diff {fmt(r['max_accuracy_difference'], 2)})"
                    if "max_accuracy_difference" in r
                    else ""
                ),
                f"{r.get('load_before', '-')}/{r.get('load_after', '-')}",
            ]
        )
    out.append(
        table(
            [
                "runtime",
                "startup s",
                "round s",
                "round x simulator",
                "client training s per round",
                "total s",
                "total x simulator",
                "final accuracy %",
                "load before/after",
            ],
            body,
        )
    )
    out.append("")
    wins = [
        r
        for r in fl["rows"]
        if r.get("round_vs_simulator") is not None and r["round_vs_simulator"] < 1.0
    ]
    for r in wins:
        out.append(
            f"- **Where Flower wins:** {r['runtime']}: {fmt(r['round_median_s'], 3)} s per round, "
            f"{fmt(r['round_vs_simulator'], 2)}x the simulator's, once Ray is up (clients train "
            "in parallel actors; the simulator trains them one after another)."
        )
    if wins:
        out.append("")
    return out


def merge_federated(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One results dictionary from several ``--only federated`` runs (e.g. one per part).

    The federated sections are merged part by part (a later run's part
    replaces an earlier one's) and keep every run's command and date; the rest
    (environment, schema) is the last run's.
    """
    if not runs:
        raise ValueError("merge_federated: no results to merge")
    fed: dict[str, Any] = {"commands": [], "runs": []}
    for r in runs:
        sec = r.get("sections", {}).get("federated") or {}
        for part in ("bytes_to_target", "overhead", "flower"):
            if sec.get(part):
                fed[part] = sec[part]
        fed["commands"].append(sec.get("command", r.get("command", "")))
        fed["runs"].append(
            {
                "command": sec.get("command", r.get("command", "")),
                "created": r.get("created"),
                "parts": sec.get("parts", []),
                "load_before": sec.get("load_before"),
                "load_after": sec.get("load_after"),
            }
        )
        fed["quick"] = bool(fed.get("quick")) or bool(sec.get("quick"))
    out = {k: v for k, v in runs[-1].items() if k != "sections"}
    out["command"] = " && ".join(fed["commands"])
    out["sections"] = {"federated": fed}
    return out


def federated_markdown(fed: Mapping[str, Any] | None) -> list[str]:
    """Section 4 of the report from ``results["sections"]["federated"]`` (``None``: a stub)."""
    if not fed:
        return [
            "## 4. Federated benchmarks",
            "",
            "Not part of this run: `python -m fedquant.tools.bench --only federated` "
            "(`fedquant.tools.bench.federated`).",
            "",
        ]
    out = [
        "## 4. Federated benchmarks",
        "",
        "Generated by:",
        "",
        "```",
        *fed.get("commands", [fed.get("command", "")]),
        "```",
        "",
    ]
    runs = fed.get("runs") or []
    if len(runs) > 1:
        out += [
            "Merged from these runs (`fedquant.tools.bench.report.merge_federated`): "
            + "; ".join(
                f"{', '.join(r.get('parts', []))} on {r.get('created')} (load average "
                f"{r.get('load_before')} before, {r.get('load_after')} after)"
                for r in runs
            )
            + ".",
            "",
        ]
    if fed.get("quick"):
        out += ["**Quick smoke run, tiny sizes: not meaningful figures.**", ""]
    if fed.get("bytes_to_target"):
        out += _bytes_md(fed["bytes_to_target"])
    if fed.get("overhead"):
        out += _overhead_md(fed["overhead"])
    if fed.get("flower"):
        out += _flower_md(fed["flower"])
    return out


# --------------------------------------------------------------------------- beyond the paper


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f} %"


def _gain(v: float | None) -> str:
    return "-" if v is None else f"{fmt(v, 3)}x"


def _bits_list(bits: Sequence[int]) -> str:
    return ", ".join(map(str, bits))


def rotation_totals(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Whole-model figures of :func:`fedquant.tools.bench.rotation.rotation_weight_errors` rows, one
    per (granularity, bits): NMSE = sum of MSE x size / sum of variance x size (as in
    section 2), bits/coordinate = payload bits / weights, gain = plain / rotated NMSE."""
    acc: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        k = (r["granularity"], r["bits"])
        a = acc.setdefault(
            k,
            {
                "model": r["model"],
                "granularity": r["granularity"],
                "bits": r["bits"],
                "rounding": r.get("rounding"),
                "numel": 0,
                "_var": 0.0,
                "_plain": 0.0,
                "_rot": 0.0,
                "_bpc_plain": 0.0,
                "_bpc_rot": 0.0,
            },
        )
        n, var = r["numel"], r.get("variance", 1.0)
        a["numel"] += n
        a["_var"] += var * n
        a["_plain"] += r["nmse_plain"] * var * n
        a["_rot"] += r["nmse_rotated"] * var * n
        a["_bpc_plain"] += r["bpc_plain"] * n
        a["_bpc_rot"] += r["bpc_rotated"] * n
    out = []
    for a in acc.values():
        plain = a["_plain"] / a["_var"] if a["_var"] else None
        rot = a["_rot"] / a["_var"] if a["_var"] else None
        out.append(
            {k: v for k, v in a.items() if not k.startswith("_")}
            | {
                "nmse_plain": plain,
                "nmse_rotated": rot,
                "gain": plain / rot if plain is not None and rot else None,
                "bpc_plain": a["_bpc_plain"] / a["numel"],
                "bpc_rotated": a["_bpc_rot"] / a["numel"],
            }
        )
    return out


def entropy_totals(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Whole-model figures of :func:`fedquant.tools.bench.entropy.entropy_weight_efficiency` rows, one
    per (rotation, bits): bits per weight of each coder (code-weighted means of the layers)
    and the encoded payload's bytes, packed and with ``entropy="rans"``."""
    acc: dict[tuple[bool, int], dict[str, Any]] = {}
    for r in rows:
        k = (bool(r["rotation"]), r["bits"])
        a = acc.setdefault(
            k,
            {
                "model": r["model"],
                "rotation": bool(r["rotation"]),
                "bits": r["bits"],
                "rounding": r.get("rounding"),
                "codes": 0,
            },
        )
        if r["layer"] == "(payload)":
            for c in ("payload_packed", "payload_rans", "saving"):
                a[c] = r[c]
            continue
        a["codes"] += r["codes"]
        for c in ("entropy", "rans", "zstd_packed", "zstd_bytes_per_code"):
            if r.get(c) is not None:
                a[f"_{c}"] = a.get(f"_{c}", 0.0) + r[c] * r["codes"]
    out = []
    for a in acc.values():
        n = max(a["codes"], 1)
        for c in ("entropy", "rans", "zstd_packed", "zstd_bytes_per_code"):
            a[c] = a.pop(f"_{c}") / n if f"_{c}" in a else None
        out.append(a)
    return out


def _pick(rows: Sequence[Row], **match: Any) -> Row | None:
    """The first row whose fields equal ``match`` (None if none)."""
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _rounding_of(rows: Sequence[Row]) -> str | None:
    """``stochastic`` (fedquant's default) if the rows have it, else their first rounding."""
    rs = [r.get("rounding") for r in rows]
    return "stochastic" if "stochastic" in rs else (rs[0] if rs else None)


def _where(cases: Sequence[str]) -> str:
    return "; ".join(cases)


def _weights_note(sec: Mapping[str, Any], model: str) -> str:
    """Where the weights of ``model`` came from, e.g. "trained centrally on mnist-embedded ..."."""
    w = (sec.get("weights") or {}).get(model) or {}
    info = w.get("train")
    if info:
        return (
            f"the paper's CNN trained centrally on `{info['dataset']}`, {info['epochs']} "
            f"epoch(s), test accuracy {100 * info['test_accuracy']:.1f} %; as in section 2"
        )
    if w.get("source"):
        return f"weights from `{w['source']}`"
    return "the weights of section 2"


#: the columns shared by the rotation tables (whole model, per layer)
_ROTATION_COLUMNS = [
    "granularity",
    "B",
    "NMSE plain",
    "NMSE rotated",
    "gain",
    "bits/coord plain",
    "bits/coord rotated",
]


def _rotation_cells(r: Mapping[str, Any]) -> list[Any]:
    """The cells of :data:`_ROTATION_COLUMNS` for one row of the rotation benchmark."""
    return [
        r["granularity"],
        r["bits"],
        fmt(r["nmse_plain"]),
        fmt(r["nmse_rotated"]),
        _gain(r["gain"]),
        f"{r['bpc_plain']:.3f}",
        f"{r['bpc_rotated']:.3f}",
    ]


def _rotation_md(rot: Mapping[str, Any], n: int, sec: Mapping[str, Any]) -> list[str]:
    syn = rot.get("synthetic", [])
    out = [
        "### 5.1 Random rotation (`QuantSpec(rotation=True)`)",
        "",
        "A seeded randomized Hadamard rotation before per-tensor OCTAV "
        "(`fedquant.quant.rotation`; the receiver rotates back with the shared key). Rotated "
        "coordinates are close to Gaussian whatever the source, so the rotated NMSE should "
        "approach the closed-form NMSE of OCTAV on a unit Gaussian (`rotated / Gaussian` = 1). "
        "Everything is measured through `encode`/`decode`; bits/coordinate = payload bits / "
        "values, so they include the padding to the rotation's block size and the headers. "
        "`gain` = NMSE plain / NMSE rotated: **> 1 means the rotation helps, < 1 that it "
        "hurts**.",
        "",
    ]
    if syn:
        out += [
            f"Synthetic sources ({n:,} seeded samples, one tensor):",
            "",
            table(
                [
                    "source",
                    "rounding",
                    "B",
                    "NMSE plain",
                    "NMSE rotated",
                    "gain",
                    "rotated / Gaussian",
                    "bits/coord plain",
                    "bits/coord rotated",
                ],
                (
                    [
                        r["source"],
                        r["rounding"],
                        r["bits"],
                        fmt(r["nmse_plain"]),
                        fmt(r["nmse_rotated"]),
                        _gain(r["gain"]),
                        fmt(r.get("rotated_vs_gaussian"), 3),
                        f"{r['bpc_plain']:.3f}",
                        f"{r['bpc_rotated']:.3f}",
                    ]
                    for r in syn
                ),
            ),
            "",
        ]
        lose = [
            f"{r['source']} {r['rounding']} B={r['bits']} ({_gain(r['gain'])})"
            for r in syn
            if r["gain"] is not None and r["gain"] < 1.0
        ]
        win = [r for r in syn if r["gain"] is not None and r["gain"] >= 1.0]
        if lose:
            out.append(f"- **Rotation is worse than plain OCTAV on:** {_where(lose)}.")
        if win:
            best = max(win, key=lambda r: r["gain"])
            out.append(
                f"- Rotation helps in {len(win)} of {len(syn)} synthetic cases, most on "
                f"{best['source']} {best['rounding']} B={best['bits']} ({_gain(best['gain'])})."
            )
        if lose or win:
            out.append("")
    for model, rows in rot.get("models", {}).items():
        if not rows:
            continue
        tot = rotation_totals(rows)
        out += [
            f"**{model}** ({_weights_note(sec, model)}; {rows[0].get('rounding')} rounding), "
            "whole model:",
            "",
            table(_ROTATION_COLUMNS, (_rotation_cells(t) for t in tot)),
            "",
            "<details><summary>per layer</summary>\n\n"
            + table(
                ["layer", "size", "excess kurtosis", *_ROTATION_COLUMNS],
                (
                    [
                        f"`{r['layer']}`",
                        f"{r['numel']:,}",
                        fmt(r.get("kurtosis"), 3),
                        *_rotation_cells(r),
                    ]
                    for r in rows
                ),
            )
            + "\n\n</details>",
            "",
        ]
        lose_t = [t for t in tot if t["gain"] is not None and t["gain"] < 1.0]
        if lose_t:
            out.append(
                f"- **{model}: the rotation is worse than plain OCTAV** (whole model) at "
                + _where([f"{t['granularity']} B={t['bits']} ({_gain(t['gain'])})" for t in lose_t])
                + "."
                + _kurtosis_note(rows)
            )
        if len(lose_t) < len(tot):
            out.append(
                f"- {model}: the rotation helps (whole model) at "
                + _where(
                    [
                        f"{t['granularity']} B={t['bits']} ({_gain(t['gain'])})"
                        for t in tot
                        if t not in lose_t and t["gain"] is not None
                    ]
                )
                + "."
            )
        extra = [t["bpc_rotated"] - t["bpc_plain"] for t in tot]
        if extra:
            out.append(
                f"- {model}: the padding costs {min(extra):.3f}-{max(extra):.3f} extra "
                "bits/coordinate over the unrotated payload."
            )
        out.append("")
    sp = rot.get("speed") or []
    if sp:
        out += _op_speed_md(sp, "melem_per_s", "M elem/s", rot.get("load_before"))
        ratio = _slowdowns(sp, (("encode(rotation)", "encode"), ("decode(rotation)", "decode")))
        if ratio:
            out += ["- " + ratio, ""]
    return out


def _kurtosis_note(rows: Sequence[Row]) -> str:
    """The layers' excess kurtosis range, the figure that says whether rotating can pay."""
    ks = [r["kurtosis"] for r in rows if r.get("kurtosis") is not None]
    if not ks:
        return ""
    return (
        f" The layers' excess kurtosis is {min(ks):.2f} to {max(ks):.2f} (Gaussian 0, Laplace "
        "3): the rotation turns values into Gaussian-like ones, which pays on heavier tails than "
        "these (the synthetic rows above) and costs where the tails are lighter."
    )


def _slowdowns(rows: Sequence[Row], pairs: Sequence[tuple[str, str]]) -> str:
    """'X with rotation takes 2.1x the time of X' for each pair, at the most threads."""
    top = max(r["threads"] for r in rows)
    by = {r["op"]: r for r in rows if r["threads"] == top}
    cells = []
    for slow, fast in pairs:
        if slow in by and fast in by and by[slow]["seconds"] > 0:
            cells.append(
                f"`{slow}` takes {fmt(by[slow]['seconds'] / by[fast]['seconds'], 3)}x the time "
                f"of `{fast}`"
            )
    return "; ".join(cells) + f" ({top} thread(s))." if cells else ""


def _op_speed_md(rows: Sequence[Row], rate: str, rate_label: str, load: str | None) -> list[str]:
    """Speed rows (op, bits, threads, ratio_memcpy, rate) as one table: ratio per thread count."""
    threaded = all("threads" in r for r in rows)
    ths = sorted({r.get("threads", 1) for r in rows})
    keys = list(dict.fromkeys((r["op"], r.get("bits")) for r in rows))
    by = {(r["op"], r.get("bits"), r.get("threads", 1)): r for r in rows}
    body = []
    for op, b in keys:
        last = by.get((op, b, ths[-1]))
        body.append(
            [f"`{op}`", "-" if b is None else b]
            + [fmt(by[op, b, t]["ratio_memcpy"], 3) if (op, b, t) in by else "" for t in ths]
            + [fmt(last[rate], 4) if last else ""]
            + ([fmt(last.get("bpc"), 4) if last else ""] if rate == "mcodes_per_s" else [])
        )
    n = rows[0]["n"]
    return [
        f"Speed on {n:,} float32 values (Gaussian): `ratio` = t(memcpy) / t(op), median of "
        "interleaved reps as in section 3; higher is better"
        + (f"; load average before: {load}" if load else "")
        + ".",
        "",
        table(
            ["op", "B"]
            + ([f"ratio, {t} thread(s)" for t in ths] if threaded else ["ratio"])
            + [rate_label]
            + (["bits/code"] if rate == "mcodes_per_s" else []),
            body,
        ),
        "",
    ]


def _entropy_md(ent: Mapping[str, Any], n: int, sec: Mapping[str, Any]) -> list[str]:
    syn = ent.get("synthetic", [])
    zstd = ent.get("zstd")
    out = [
        '### 5.2 Entropy coding (rANS, `QuantSpec(entropy="rans")`)',
        "",
        "fedquant's static rANS coder (`fedquant.quant.entropy`) on the codes of per-tensor "
        "OCTAV, against the codes' order-0 empirical entropy (the coder's floor) and the "
        "nominal `B` bits of packing. Bits per code include the frequency table and the "
        "coder's states. `saving` = 1 - rANS bits / B. "
        + (
            f"zstd (level 3, `zstandard` {zstd}, a general-purpose peer) compresses the packed "
            "codes and, separately, one byte per code."
            if zstd
            else "zstd columns are empty: `zstandard` is not installed."
        ),
        "",
    ]
    if syn:
        out += [
            f"Synthetic sources ({n:,} seeded samples):",
            "",
            table(
                [
                    "source",
                    "rotation",
                    "rounding",
                    "B",
                    "entropy",
                    "rANS bits/code",
                    "rANS over entropy",
                    "saving vs B",
                    "zstd (packed)",
                    "zstd (byte/code)",
                ],
                (
                    [
                        r["source"],
                        "yes" if r["rotation"] else "no",
                        r["rounding"],
                        r["bits"],
                        fmt(r["entropy"], 4),
                        fmt(r["rans"], 4),
                        _pct(r.get("rans_over_entropy"), 3),
                        _pct(1.0 - r["rans"] / r["bits"]),
                        fmt(r.get("zstd_packed"), 4),
                        fmt(r.get("zstd_bytes_per_code"), 4),
                    ]
                    for r in syn
                ),
            ),
            "",
        ]
        out += _entropy_verdicts(
            syn,
            lambda r: (
                f"{r['source']}{' rotated' if r['rotation'] else ''} {r['rounding']} B={r['bits']}"
            ),
        )
    for model, rows in ent.get("models", {}).items():
        if not rows:
            continue
        tot = entropy_totals(rows)
        out += [
            f"**{model}** ({_weights_note(sec, model)}; {rows[0].get('rounding')} rounding): bits "
            "per weight over the conv and linear weights, and the bytes of the whole encoded "
            "state (`encode`, every tensor, headers included; rANS only where it saves bytes):",
            "",
            table(
                [
                    "rotation",
                    "B",
                    "entropy",
                    "rANS bits/weight",
                    "zstd (packed)",
                    "payload packed B",
                    "payload rANS B",
                    "payload saving",
                ],
                (
                    [
                        "yes" if t["rotation"] else "no",
                        t["bits"],
                        fmt(t.get("entropy"), 4),
                        fmt(t.get("rans"), 4),
                        fmt(t.get("zstd_packed"), 4),
                        _bytes(t.get("payload_packed")),
                        _bytes(t.get("payload_rans")),
                        _pct(t.get("saving")),
                    ]
                    for t in tot
                ),
            ),
            "",
            "<details><summary>per layer</summary>\n\n"
            + table(
                ["layer", "rotation", "B", "entropy", "rANS", "zstd (packed)", "zstd (byte/code)"],
                (
                    [
                        f"`{r['layer']}`",
                        "yes" if r["rotation"] else "no",
                        r["bits"],
                        fmt(r["entropy"], 4),
                        fmt(r["rans"], 4),
                        fmt(r.get("zstd_packed"), 4),
                        fmt(r.get("zstd_bytes_per_code"), 4),
                    ]
                    for r in rows
                    if r["layer"] != "(payload)"
                ),
            )
            + "\n\n</details>",
            "",
        ]
        none = [t for t in tot if t.get("saving") is not None and t["saving"] <= 0.0]
        if none:
            out.append(
                f"- **{model}: rANS saves nothing** on the payload at "
                + _where([_rot_label(t) for t in none])
                + " (the codec then keeps the packed codes)."
            )
        saved = [t for t in tot if t.get("saving") is not None and t["saving"] > 0.0]
        if saved:
            lo = min(saved, key=lambda t: t["saving"])
            hi = max(saved, key=lambda t: t["saving"])
            out.append(
                f"- {model}: rANS saves {_pct(lo['saving'])} ({_rot_label(lo)}) to "
                f"{_pct(hi['saving'])} ({_rot_label(hi)}) of the payload."
            )
        zwin = [
            t
            for t in tot
            if t.get("zstd_packed") is not None
            and t.get("rans") is not None
            and t["zstd_packed"] < t["rans"]
        ]
        if zwin:
            out.append(
                f"- **{model}: zstd on the packed codes beats rANS** at "
                + _where([_rot_label(t) for t in zwin])
                + "."
            )
        out.append("")
    sp = ent.get("speed") or []
    if sp:
        out += _op_speed_md(sp, "mcodes_per_s", "M codes/s", ent.get("load_before"))
        by = {(r["op"], r["bits"]): r for r in sp}
        cells = []
        for b in sorted({r["bits"] for r in sp}):
            dec, ref = by.get(("rans decode (levels)", b)), by.get(("packed dequantize", b))
            if dec and ref:
                cells.append(
                    f"B={b}: {fmt(dec['seconds'] / ref['seconds'], 3)}x the time of unpacking"
                )
        if cells:
            out += [
                "- rANS decoding straight to float32 levels vs `dequantize` of packed codes: "
                + "; ".join(cells)
                + ".",
                "",
            ]
    return out


def _rot_label(t: Row) -> str:
    return f"B={t['bits']} {'rotated' if t['rotation'] else 'unrotated'}"


def _entropy_verdicts(rows: Sequence[Row], label: Any) -> list[str]:
    out = []
    zwin = [
        label(r) + f" ({fmt(r['zstd_packed'], 3)} < {fmt(r['rans'], 3)} bits)"
        for r in rows
        if r.get("zstd_packed") is not None and r["zstd_packed"] < r["rans"]
    ]
    if zwin:
        out.append(f"- **zstd on the packed codes beats rANS on:** {_where(zwin)}.")
    elif any(r.get("zstd_packed") is not None for r in rows):
        out.append("- zstd on the packed codes is never below rANS here.")
    nosave = [label(r) for r in rows if r["rans"] >= r["bits"]]
    if nosave:
        out.append(f"- **rANS saves nothing over packing on:** {_where(nosave)}.")
    over = [r["rans_over_entropy"] for r in rows if r.get("rans_over_entropy") is not None]
    if over:
        out.append(
            f"- rANS is within {_pct(max(over), 3)} of the entropy (worst case), "
            f"{_pct(min(over), 3)} at best."
        )
    return [*out, ""] if out else []


def _allocation_md(al: Mapping[str, Any], sec: Mapping[str, Any]) -> list[str]:
    out = [
        '### 5.3 Adaptive bit allocation (`bits="auto:B"`)',
        "",
        "Per-layer widths chosen to minimize the total squared error `sum_l n_l MSE_l` at a "
        "budget of bits per weight (`fedquant.quant.allocation`), against fixed widths at "
        "**the same budget** (the fixed setting's bits per weight; same bytes up to rounding), "
        "stochastic rounding, on the model weights (`fedquant.tools.bench.allocation."
        "codec_comparison`). `sq error x fixed` < 1: the allocation wins. Encode time: median "
        "of repeated `encode` calls, the allocation included.",
        "",
    ]
    for model, rows in al.get("models", {}).items():
        if not rows:
            continue
        layers = list(dict.fromkeys(k for r in rows for k in r["bits"]))
        out += [
            f"**{model}** ({_weights_note(sec, model)}):",
            "",
            table(
                ["spec", "at the budget of"]
                + [f"`{k}`" for k in layers]
                + [
                    "bits/weight",
                    "bytes",
                    "sq error",
                    "sq error x fixed",
                    "encode ms",
                    "encode x fixed",
                ],
                (
                    [f"`{r['spec']}`", f"`{r['budget_of']}`"]
                    + [str(r["bits"].get(k, "-")) for k in layers]
                    + [
                        f"{r['bits_per_weight']:.4f}",
                        _bytes(r["bytes"]),
                        fmt(r["sq_error"]),
                        fmt(r.get("sq_error_ratio"), 3),
                        fmt(r["encode_ms"], 3),
                        fmt(r.get("encode_ratio"), 3),
                    ]
                    for r in rows
                ),
            ),
            "",
        ]
        autos = [r for r in rows if r["spec"] != r["budget_of"]]
        fixed = {r["spec"]: r for r in rows if r["spec"] == r["budget_of"]}
        for r in autos:
            ref = fixed.get(r["budget_of"])
            ratio = r.get("sq_error_ratio")
            if ref is None or ratio is None:
                continue
            same = r["bits"] == ref["bits"]
            what = (
                "chose the same widths as"
                if same
                else "chose "
                + "-".join(str(r["bits"][k]) for k in layers if k in r["bits"])
                + " instead of"
            )
            if ratio > 1.0:
                verdict = f"**{fmt(ratio, 3)}x the squared error: worse**" + (
                    " (same widths; the stochastic draws differ)" if same else ""
                )
            elif ratio < 1.0:
                verdict = f"{fmt(ratio, 3)}x the squared error"
            else:
                verdict = "the same squared error"
            out.append(
                f"- {model}, budget of `{r['budget_of']}`: `auto` {what} `{r['budget_of']}`, "
                f"{verdict}, encode {fmt(r.get('encode_ratio'), 3)}x the time."
            )
        out.append("")
    return out


def beyond_markdown(sec: Mapping[str, Any]) -> list[str]:
    """Section 5 of the report from ``results["sections"]["beyond"]``."""
    out = [
        "## 5. Beyond the paper: rotation, entropy coding, adaptive bit allocation",
        "",
        "fedquant options the paper does not have, measured through fedquant's codec on the "
        "synthetic sources and model weights of section 2 (loaded once for both): "
        "`QuantSpec(rotation=True)`, "
        '`QuantSpec(entropy="rans")` and `bits="auto:2.03"` (`RunConfig` takes the same '
        "settings). Every verdict below is computed from the rows of `bench.json` "
        "(`sections.beyond`).",
        "",
    ]
    n = sec.get("n", 0)
    if sec.get("rotation"):
        out += _rotation_md(sec["rotation"], n, sec)
    if sec.get("entropy"):
        out += _entropy_md(sec["entropy"], n, sec)
    if sec.get("allocation"):
        out += _allocation_md(sec["allocation"], sec)
    if sec.get("skipped"):
        out += ["Skipped: " + "; ".join(sec["skipped"]), ""]
    return out


def beyond_headline(results: Mapping[str, Any]) -> list[str]:
    """Headline bullets of section 5 (rotation on Student-t(3) and on trained weights at 4
    bits, rANS at 2 bits, allocation at 4-2-2-4's budget), computed from its rows."""
    sec = results.get("sections", {}).get("beyond")
    if not sec:
        return []
    out: list[str] = []
    rot = sec.get("rotation") or {}
    syn = rot.get("synthetic") or []
    rnd = _rounding_of(syn)
    r = _pick(syn, source="student-t3", bits=4, rounding=rnd)
    if r:
        out.append(
            f"- Random rotation before OCTAV, Student-t(3), 4 bits, {rnd} rounding: NMSE "
            f"{fmt(r['nmse_plain'], 3)} -> {fmt(r['nmse_rotated'], 3)} "
            f"({_gain(r['gain'])} {'lower' if r['gain'] >= 1 else 'HIGHER: worse'}) at "
            f"{r['bpc_rotated']:.3f} bits/coordinate"
        )
    for model, rows in (rot.get("models") or {}).items():
        t = _pick(rotation_totals(rows), granularity="tensor", bits=4)
        if t and t["gain"] is not None:
            out.append(
                f"- Rotation on {model} weights, per tensor, 4 bits, {t['rounding']} rounding: NMSE "
                f"{fmt(t['nmse_plain'], 3)} -> {fmt(t['nmse_rotated'], 3)}: "
                + (
                    f"{_gain(t['gain'])} lower"
                    if t["gain"] >= 1
                    else f"**worse** ({fmt(1 / t['gain'], 3)}x the error of plain OCTAV)"
                )
            )
    ent = sec.get("entropy") or {}
    esyn = ent.get("synthetic") or []
    rnd = _rounding_of(esyn)
    r = _pick(esyn, source="gaussian", bits=2, rounding=rnd, rotation=False)
    if r:
        out.append(
            f"- rANS on 2-bit OCTAV codes of a Gaussian ({rnd}): {fmt(r['rans'], 4)} bits/code "
            f"(entropy {fmt(r['entropy'], 4)}): "
            + (
                f"{_pct(1 - r['rans'] / 2)} fewer bits than packing"
                if r["rans"] < 2
                else f"**no saving** ({_pct(r['rans'] / 2 - 1)} more bits than packing)"
            )
            + (
                f"; zstd-3 on the packed codes {fmt(r['zstd_packed'], 4)}"
                if r.get("zstd_packed") is not None
                else ""
            )
        )
    for model, rows in (ent.get("models") or {}).items():
        t = _pick(entropy_totals(rows), bits=2, rotation=False)
        if t and t.get("saving") is not None:
            out.append(
                f"- rANS on the {model} payload at 2 bits: {_bytes(t['payload_packed'])} -> "
                f"{_bytes(t['payload_rans'])} bytes ("
                + (f"{_pct(t['saving'])} saved)" if t["saving"] > 0 else "**no saving**)")
            )
    for model, rows in ((sec.get("allocation") or {}).get("models") or {}).items():
        auto = next(
            (x for x in rows if x["budget_of"] == "4-2-2-4" and x["spec"] != "4-2-2-4"), None
        )
        if auto and auto.get("sq_error_ratio") is not None:
            ratio = auto["sq_error_ratio"]
            out.append(
                f"- `auto` bit allocation at 4-2-2-4's budget ({auto['bits_per_weight']:.3f} "
                f"bits/weight) on {model}: "
                + "-".join(str(b) for b in auto["bits"].values())
                + f", {fmt(ratio, 3)}x the squared error of 4-2-2-4"
                + (" (**worse**)" if ratio > 1 else "")
            )
    return out


def write_markdown(results: Mapping[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(markdown(results))
    return p
