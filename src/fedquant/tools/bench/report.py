"""The benchmark report: ``bench.json`` (every row) and ``bench.md`` (its tables).

The JSON, the tables and the environment line come from :mod:`fedquant.tools.report`.
``bench.md`` is rendered from the JSON alone (:func:`markdown`), so a stored
``bench.json`` re-renders without running anything. The report holds tables
and numbers only; what each table measures, and how to read it, is written
by hand in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedquant.tools.report import Row, environment_line, table, write_json

SCHEMA = 1


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


#: significant digits kept in the JSON (measurements are not more precise than this)
JSON_DIGITS = 7


def save(
    results: Mapping[str, Any], out: str | Path, markdown_path: str | Path | None = None
) -> tuple[Path, Path]:
    """Write ``OUT/bench.json`` (floats to :data:`JSON_DIGITS` significant digits, NaN and
    infinities as null, one table row per line) and the Markdown rendered from that file as
    written (default ``OUT/bench.md``), so re-rendering the JSON gives the same text.

    Returns
    -------
    (pathlib.Path, pathlib.Path)
        The JSON and the Markdown file.
    """
    js = write_json(Path(out) / "bench.json", results, digits=JSON_DIGITS, rows=True)
    md = write_markdown(json.loads(js.read_text()), markdown_path or Path(out) / "bench.md")
    return js, md


# --------------------------------------------------------------------------- helpers


def _settings(pairs: Iterable[tuple[str, Any]]) -> list[str]:
    """A two-column table of a section's settings (rows whose value is None left out)."""
    rows = [(k, v) for k, v in pairs if v is not None]
    return [table(["setting", "value"], rows), ""] if rows else []


def _tbl(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A table and the blank line after it."""
    return [table(header, rows), ""]


def _titled(heading: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A heading and its table; nothing when there are no rows."""
    return [heading, "", *_tbl(header, rows)] if rows else []


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


def _x(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{fmt(v, digits)}x"


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f} %"


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def _bytes(b: float | None) -> str:
    return "-" if b is None else f"{b:,.0f}"


def _yes(v: Any) -> str:
    return "yes" if v else "no"


def _scheme_label(r: Row) -> str:
    if r["scheme"] == "fedquant":
        gran = f", {r['granularity']}" if r.get("granularity") == "channel" else ""
        return f"fedquant {r['method']} ({r['rounding']}{gran})"
    return str(r["scheme"])


def _bits_table(rows: Sequence[Row], bits: Sequence[int]) -> str:
    """Rows = scheme, columns = bit widths, cells = NMSE (and bits/coord where it differs
    from B by more than 5 %)."""
    order: list[str] = []
    cells: dict[tuple[str, int], str] = {}
    for r in rows:
        label = _scheme_label(r)
        if label not in order:
            order.append(label)
        cell = fmt(r["nmse"])
        bpc = r.get("bpc")
        if bpc is not None and abs(bpc - r["bits"]) > 0.05 * r["bits"]:
            cell += f" ({bpc:.2f} b)"
        cells[label, r["bits"]] = cell
    return table(
        ["scheme"] + [f"B={b}" for b in bits],
        ([lab] + [cells.get((lab, b), "") for b in bits] for lab in order),
    )


def _weights_table(weights: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Where each model's weights came from: training run (dataset, epochs, seed, test
    accuracy) or checkpoint path."""
    rows = []
    for model, w in weights.items():
        info = w.get("train") or {}
        rows.append(
            [
                model,
                f"`{info['dataset']}`" if info else "-",
                info.get("epochs", "-"),
                info.get("seed", "-"),
                _pct(info.get("test_accuracy")),
                f"`{w['source']}`" if w.get("source") else "trained centrally",
            ]
        )
    if not rows:
        return []
    return [
        table(["model", "trained on", "epochs", "seed", "test accuracy", "weights"], rows),
        "",
    ]


# --------------------------------------------------------------------------- grid and error


def _grid_md(sec: Mapping[str, Any]) -> list[str]:
    rows = sec["rows"]
    bits = sorted({r["bits"] for r in rows})
    out = ["## Level grid and OCTAV's noise coefficient", ""]
    out += _settings([("Monte-Carlo samples", f"{sec['n']:,}")])
    for src in dict.fromkeys(r["source"] for r in rows):
        rs = [r for r in rows if r["source"] == src]
        cases = list(dict.fromkeys(r["case"] for r in rs))
        by = {(r["case"], r["bits"]): r for r in rs}
        body = []
        for case in cases:
            first = next(r for r in rs if r["case"] == case)
            body.append(
                [first["description"]]
                + [
                    f"{fmt(by[case, b]['nmse_octav'])} ({100 * by[case, b]['excess']:+.1f}%)"
                    if (case, b) in by
                    else ""
                    for b in bits
                ]
            )
        thresholds = [
            [by[c, bits[0]]["description"]] + [fmt(by[c, b]["s_octav"], 3) for b in bits]
            for c in cases
            if (c, bits[0]) in by
        ]
        out += [
            f"### {src}",
            "",
            table(["grid, rounding, c: NMSE (excess)"] + [f"B={b}" for b in bits], body),
            "",
            _details(
                "OCTAV thresholds s/σ", table(["case"] + [f"B={b}" for b in bits], thresholds)
            ),
            "",
        ]
    return out


def _error_md(sec: Mapping[str, Any]) -> list[str]:
    syn = sec["synthetic"]
    bits = sorted({r["bits"] for r in syn}) if syn else []
    out = ["## Quantization error (NMSE)", ""]
    out += _settings([("synthetic samples", f"{sec['n']:,}")])
    for src in dict.fromkeys(r["source"] for r in syn):
        rs = [r for r in syn if r["source"] == src]
        out += [f"### {src}", "", _bits_table(rs, bits), ""]
    models = sec.get("models", {})
    if models:
        out += ["### Model weights", ""]
        out += _weights_table(models)
    for model, m in models.items():
        tb = sorted({r["bits"] for r in m["total"]})
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
            for lab in dict.fromkeys(_scheme_label(r) for r in per if r["source"] == src):
                cells = {
                    r["bits"]: fmt(r["nmse"])
                    for r in per
                    if r["source"] == src and _scheme_label(r) == lab
                }
                body.append([src.split("/", 1)[1], lab] + [cells.get(b, "") for b in tb])
        layers = ", ".join(f"`{k}` ({v:,})" for k, v in m.get("layers", {}).items())
        out += [
            f"### {model}: whole model",
            "",
            *_settings([("layers (values)", layers or None)]),
            _bits_table(m["total"], tb),
            "",
            _details(
                "per layer: OCTAV and the limits",
                table(["layer", "scheme"] + [f"B={b}" for b in tb], body),
            ),
            "",
        ]
    if sec.get("skipped"):
        out += ["Skipped: " + "; ".join(sec["skipped"]), ""]
    return out


# --------------------------------------------------------------------------- speed


def _cell(r: Row) -> str:
    """A speed ratio, with the 1-thread CPU-time ratio in parentheses."""
    cpu = r.get("cpu_ratio_memcpy")
    return fmt(r["ratio_memcpy"], 3) + (
        f" (cpu {fmt(cpu, 3)})" if cpu and r.get("threads") == 1 else ""
    )


def _speed_md(sec: Mapping[str, Any]) -> list[str]:
    fq = sec["fedquant"]
    ths = sorted({r["threads"] for r in fq})
    out = ["## Speed", ""]
    out += _settings(
        [
            ("float32 elements", f"{sec['n']:,}"),
            ("timed reps", sec.get("reps")),
            ("memcpy GB/s (median)", fmt(sec.get("memcpy_gbps_median"), 3)),
            ("load average before / after", f"{sec.get('load_before', '-')} / "
             f"{sec.get('load_after', '-')}"),
            ("GPU", sec["device"][0]["device"] if sec.get("device") else "none timed"),
        ]
    )  # fmt: skip
    ops = list(
        dict.fromkeys((r["op"], r["bits"], r["rounding"]) for r in fq if r["op"] != "threshold")
    )
    by = {(r["op"], r["bits"], r["rounding"], r["threads"]): r for r in fq}
    body = [
        [f"`{op}`", b, rnd]
        + [_cell(by[op, b, rnd, t]) if (op, b, rnd, t) in by else "" for t in ths]
        + [fmt(by[op, b, rnd, ths[-1]]["melem_per_s"], 4)]
        for op, b, rnd in ops
    ]
    out += _tbl(
        ["op", "B", "rounding"] + [f"ratio, {t} thread(s)" for t in ths] + ["M elem/s (all)"],
        body,
    )
    out += _speed_goals_md(fq)
    thr = [r for r in fq if r["op"] == "threshold"]
    if thr:
        out += [
            "### OCTAV threshold",
            "",
            table(
                ["op", "threads", "x memcpy", "x np.abs(x).sum()", "x torch abs().sum()"],
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
            ),
            "",
        ]
    if sec.get("peers"):
        out += [
            "### Peers",
            "",
            table(
                ["peer", "op", "B", "threads", "ratio", "M elem/s"],
                (
                    [r["impl"], r["op"], r["bits"], r["threads"], _cell(r),
                     fmt(r["melem_per_s"], 4)]
                    for r in sec["peers"]
                ),
            ),
            "",
        ]  # fmt: skip
    if sec.get("device"):
        dev = sec["device"]
        out += [
            f"### Torch on `{dev[0]['device']}` (ratio to `Tensor.copy_`)",
            "",
            table(
                ["op", "B", "rounding", "ratio", "M elem/s"],
                (
                    [f"`{r['op']}`", r["bits"], r["rounding"], _cell(r), fmt(r["melem_per_s"], 4)]
                    for r in dev
                ),
            ),
            "",
        ]
    return out


def _speed_goals_md(fq: Sequence[Row]) -> list[str]:
    """The speed goals (:data:`fedquant.tools.bench.speed.SPEED_GOALS`): met, or the ratio."""
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
        enc = by_key(fq, ("encode", 8, "nearest", t))
        peer = next((r for r in fq if r["op"] == TORCH_QINT8_OP and r["threads"] == t), None)
        if enc and peer and peer.get("ratio_memcpy"):
            rel = enc["ratio_memcpy"] / peer["ratio_memcpy"]
            cells = ["-"] * len(ths)
            cells[ths.index(t)] = f"{fmt(rel, 3)}x qint8 {'met' if rel >= 1 else 'not met'}"
            body.append([f"8-bit nearest encode vs torch qint8 ({t} thread(s))", ">= 1x", *cells])
    if not body:
        return []
    return [
        "### Goals",
        "",
        table(["goal", "target (1 / all threads)"] + [f"{t} thread(s)" for t in ths], body),
        "",
    ]


def by_key(rows: Sequence[Row], key: tuple[str, int, str, int]) -> Row | None:
    """The speed row of (op, bits, rounding, threads), or None."""
    return next((r for r in rows if (r["op"], r["bits"], r["rounding"], r["threads"]) == key), None)


# --------------------------------------------------------------------------- summaries


def headline(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(figure, value) pairs computed from the results: the figures the README quotes."""
    out: list[tuple[str, str]] = []
    sec = results.get("sections", {})
    sp = sec.get("speed")
    if sp:
        fq = sp["fedquant"]
        top = max(r["threads"] for r in fq)
        for op in ("kernel(scale=s)", "quantize(scale=s)", "encode", "decode"):
            cells = []
            for b in sorted({r["bits"] for r in fq if r["op"] == op}):
                rr = {
                    r["threads"]: r
                    for r in fq
                    if r["op"] == op and r["bits"] == b and r["rounding"] == "stochastic"
                }
                if not rr:
                    continue
                med = " / ".join(fmt(rr[t]["ratio_memcpy"], 2) for t in sorted(rr))
                cpu = rr[min(rr)].get("cpu_ratio_memcpy")
                cells.append(f"B={b}: {med} (cpu {fmt(cpu, 2)})")
            if cells:
                out.append(
                    (f"`{op}` x memcpy, stochastic, 1 / {top} threads (1-thread CPU time)",
                     "; ".join(cells))
                )  # fmt: skip
        for r in fq:
            if r["op"] == "threshold" and r["threads"] == top:
                out.append(
                    (f"OCTAV threshold, {top} threads: x np.abs(x).sum() / x torch "
                     "x.abs().sum() / x memcpy",
                     f"{fmt(r.get('x_abs_sum_numpy'), 2)} / {fmt(r.get('x_abs_sum_torch'), 2)}"
                     f" / {fmt(1.0 / r['ratio_memcpy'], 2)}")
                )  # fmt: skip
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
            bs = "/".join(map(str, bits))
            out.append(
                (f"Gaussian NMSE, OCTAV stochastic, B={bs}", " / ".join(fmt(v, 3) for v in oc))
            )
            out.append(
                (
                    f"Gaussian NMSE, best stochastic uniform, B={bs}",
                    " / ".join(fmt(v, 3) for v in lim),
                )
            )
    return out + beyond_headline(results)


#: rows of the error tables that are not peers: ``hadamard-octav`` is the peers' reference
#: implementation of rotation + OCTAV (:mod:`fedquant.tools.bench.peers`), kept as a
#: cross-check of ``QuantSpec(rotation=True)``
PREVIEWS = ("hadamard-octav",)


def _error_rows(results: Mapping[str, Any]) -> list[Row]:
    er = results.get("sections", {}).get("error")
    if not er:
        return []
    rows = list(er.get("synthetic", []))
    for m in er.get("models", {}).values():
        rows += m["total"]
    return rows


def peer_wins(results: Mapping[str, Any]) -> list[list[str]]:
    """Where a peer has lower NMSE than fedquant's OCTAV (best of the two roundings, per
    tensor) at the same nominal bits: rows of source, B, peer, its NMSE and bits/coord,
    fedquant's NMSE."""
    rows = _error_rows(results)
    fed: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["scheme"] == "fedquant" and r["method"] == "octav" and r["granularity"] == "tensor":
            k = (r["source"], r["bits"])
            fed[k] = min(fed.get(k, math.inf), r["nmse"])
    names = set(results.get("peers", [])) - set(PREVIEWS)
    return [
        [r["source"], str(r["bits"]), f"`{r['scheme']}`", fmt(r["nmse"]), f"{r['bpc']:.2f}",
         fmt(fed[r["source"], r["bits"]])]
        for r in rows
        if r["scheme"] in names
        and (r["source"], r["bits"]) in fed
        and r["nmse"] < fed[r["source"], r["bits"]]
    ]  # fmt: skip


def peer_speed_wins(results: Mapping[str, Any]) -> list[list[str]]:
    """Peers whose encode or decode beats fedquant's public ``quantize(scale=s)`` /
    ``dequantize`` at the same bits (either rounding), both on one thread, by the
    CPU-time ratio to memcpy: rows of peer, op, B, its ratio, fedquant's op and ratio."""
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
            out.append([r["impl"], r["op"], str(r["bits"]), fmt(v, 3), f"`{what}`", fmt(mine, 3)])
    return out


def markdown(results: Mapping[str, Any]) -> str:
    """The whole report as Markdown, generated from the results dictionary."""
    env = results.get("environment") or {}
    out = [
        "# fedquant benchmarks",
        "",
        "```",
        results.get("command", ""),
        "```",
        "",
        environment_line(env),
        "",
        *_settings(
            [("created", results.get("created")), ("quick (tiny sizes)", _yes(results.get("quick")))]
        ),
    ]  # fmt: skip
    out += _titled("## Headline", ["figure", "value"], headline(results))
    out += _titled(
        "## Peers with lower NMSE than OCTAV",
        ["source", "B", "peer", "NMSE", "bits/coord", "fedquant OCTAV NMSE"],
        peer_wins(results),
    )
    out += _titled(
        "## Peers faster than fedquant (1 thread, CPU time)",
        ["peer", "op", "B", "x memcpy", "fedquant", "x memcpy"],
        peer_speed_wins(results),
    )
    sec = results.get("sections", {})
    for key, render in (("grid", _grid_md), ("error", _error_md), ("speed", _speed_md)):
        out += render(sec[key]) if sec.get(key) else []
    out += federated_markdown(sec.get("federated"))
    out += beyond_markdown(sec["beyond"]) if sec.get("beyond") else []
    out += _averaging_md(sec["averaging"]) if sec.get("averaging") else []
    return "\n".join(out)


# --------------------------------------------------------------------------- averaging


def _averaging_md(av: Mapping[str, Any]) -> list[str]:
    clients = [str(n) for n in av["clients"]]
    top = clients[-1]
    out = ["## Averaging: one upload vs the server's mean of N uploads", ""]
    out += _settings(
        [
            ("sources", "a unit Gaussian (as one 2-D tensor) and the models' conv and "
             "linear weights"),
            ("Gaussian values", f"{av['n_gaussian']:,}"),
            ("uploads averaged (N)", ", ".join(clients)),
            ("each upload", "the same tensors, its own seed (seed, client)"),
            ("skipped", ", ".join(av.get("skipped", [])) or None),
        ]
    )  # fmt: skip
    rows = av["rows"]
    best = []
    keys = list(dict.fromkeys((r["source"], r["rounding"], r["bits"]) for r in rows))
    for src, rnd, b in keys:
        group = [r for r in rows if (r["source"], r["rounding"], r["bits"]) == (src, rnd, b)]
        first = min(group, key=lambda r: r["nmse"]["1"])
        last = min(group, key=lambda r: r["nmse"][top])
        best.append([src, rnd, b, f"`{first['method']}`", f"`{last['method']}`"])
    out += _titled(
        f"### Lowest error: one upload vs the mean of {top}",
        ["source", "rounding", "B", "lowest NMSE, 1 upload", f"lowest NMSE, mean of {top}"],
        best,
    )
    head = ["source", "B", "method", *(f"NMSE, mean of {n}" if n != "1" else "NMSE, 1 upload"
                                       for n in clients),
            f"mean of {top} / 1 upload", "share of 1 upload's error that averaging keeps"]  # fmt: skip
    for rnd in sorted({r["rounding"] for r in rows}):
        body = [
            [r["source"], r["bits"], f"`{r['method']}`", *(fmt(r["nmse"][n]) for n in clients),
             _x(r["nmse"][top] / r["nmse"]["1"] if r["nmse"]["1"] else None),
             "-" if r["bias_share"] is None else f"{100 * r['bias_share']:.0f} %"]
            for r in rows
            if r["rounding"] == rnd
        ]  # fmt: skip
        out += _titled(f"### {rnd.capitalize()} rounding", head, body)
    sweep = av.get("sweep") or []
    if sweep:
        factors = list(sweep[0]["nmse"])
        out += _titled(
            f"### Stochastic rounding: the threshold that is best for the mean of {top}",
            ["source", "B", *(f"{f} x OCTAV" for f in factors), "best", "best / OCTAV"],
            [
                [r["source"], r["bits"], *(fmt(r["nmse"][f]) for f in factors),
                 f"{r['best_factor']:g} x", _x(r["best_nmse"] / r["nmse"]["1"])]
                for r in sweep
            ],
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- federated


def _bytes_md(bt: Mapping[str, Any]) -> list[str]:
    out = ["### Uplink bytes to the target accuracy", ""]
    loads = [r.get("load_before") for r in bt.get("runs", []) if r.get("load_before") is not None]
    out += _settings(
        [
            ("dataset", f"`{bt['dataset']}`"),
            ("train / test images", f"{bt['train_examples']:,} / {bt['test_examples']:,}"),
            ("IID clients", bt["num_clients"]),
            ("rounds", bt["rounds"]),
            ("seeds", ", ".join(map(str, bt["seeds"]))),
            ("float32 rounds averaged (last k)", bt["k"]),
            ("margin", f"{100 * bt['margin']:.0f} point(s)"),
            ("target per seed", ", ".join(
                f"{s}: {100 * t:.2f} %" for s, t in bt.get("targets", {}).items()) or None),
            ("load average during the runs",
             f"{min(loads):.1f}-{max(loads):.1f}" if loads else None),
        ]
    )  # fmt: skip
    body = [
        [
            f"`{r['method']}`",
            _bytes(r["uplink_bytes_per_round"]),
            _x(1.0 / r["per_round_vs_fp32"]) if r.get("per_round_vs_fp32") else "-",
            f"{r['reached']}/{r['seeds']}",
            ", ".join("-" if x is None else str(x) for x in r.get("rounds_to_target_per_seed", [])),
            _bytes(r["bytes_to_target"]),
            _x(r.get("fewer_bytes_than_fp32")) if r.get("fewer_bytes_than_fp32") else "-",
            f"{100 * r['final_accuracy']:.1f} ({100 * r['final_accuracy_min']:.1f}-"
            f"{100 * r['final_accuracy_max']:.1f})",
        ]
        for r in bt["methods"]
    ]
    out += _tbl(
            ["method", "uplink B/round", "smaller per round", "seeds reaching target",
             "round reached, per seed", "uplink B to target", "fewer B than float32",
             "final accuracy % (min-max)"],
            body,
        )  # fmt: skip
    if bt.get("skipped"):
        out += ["Left out: " + "; ".join(bt["skipped"]), ""]
    return out


#: the timed parts of a round, as :func:`fedquant.tools.bench.federated.overhead` names them
_PARTS = ("train", "evaluate", "encode", "admit", "aggregate", "broadcast", "load_state")


def _overhead_md(ov: Mapping[str, Any]) -> list[str]:
    st, al, mem = ov["steady"], ov["all"], ov["memory"]
    cfg = ov["config"]
    out = ["### The simulator's overhead and memory (the default run)", ""]
    out += _settings(
        [
            ("rounds", cfg["rounds"]),
            ("clients", cfg["num_clients"]),
            ("bits, rounding", f"`{cfg['bits']}` {cfg['rounding']}"),
            ("aggregation", cfg["aggregation"]),
            ("training images per round", f"{ov['train_examples']:,}"),
            ("torch threads", ov["threads"]),
            ("fresh process", _yes(ov.get("fresh_process"))),
            ("steady rounds", f"{ov['warmup'] + 1}..{cfg['rounds']}"),
        ]
    )

    def part(label: str, key: str, seconds: float) -> list[str]:
        return [label, fmt(seconds, 3), _pct(st[f"share_{key}"], 2), _pct(al[f"share_{key}"], 2)]

    body = [part(c, c, st[c]) for c in _PARTS]
    if "results" in st:  # benchmarks from before the results files were timed lack it
        body.append(part("results files", "results", st["results"]))
    body += [
        part("other", "other", st["other"]),
        part("**overhead** (all but train and evaluate)", "non_training", st["non_training"]),
        part(
            "overhead + evaluation",
            "non_training_with_evaluate",
            st["non_training"] + st["evaluate"],
        ),
        ["round (wall)", fmt(st["seconds_round"], 4), "100 %", "100 %"],
    ]
    out += _tbl(["part", "seconds (steady)", "share (steady)", "share (all rounds)"], body)
    loads = [r["load"] for r in ov["rounds"] if r.get("load") is not None]
    figures = [
        ("overhead share, median of steady rounds", _pct(st["median_share_non_training"], 2)),
        ("CPU-time share: training / evaluation / overhead",
         f"{_pct(st['cpu_share_train'])} / {_pct(st['cpu_share_evaluate'])} / "
         f"{_pct(st['cpu_share_non_training'], 2)}"),
        ("overhead CPU seconds (steady rounds)",
         f"{st['cpu_non_training']:.2f} over {st['rounds']} rounds"),
        ("training samples/s", f"{st['samples_per_s']:,.0f} ({st['samples']:,.0f} samples in "
         f"{st['train']:.1f} s)"),
        ("load average during the run", f"{min(loads):.1f}-{max(loads):.1f}" if loads else None),
        ("RSS after round 1 / at the end / peak",
         f"{_mib(mem['rss_after_setup_round1'])} / {_mib(mem['rss_end'])} / "
         f"{_mib(mem['peak_rss'])}"),
        ("RSS slope over steady rounds", f"{mem['slope_bytes_per_round'] / 1024:+.1f} KiB/round"),
        ("one float32 model", f"{mem['model_float32_bytes'] / 1024:.0f} KiB"),
    ]  # fmt: skip
    out += [table(["figure", "value"], [(k, v) for k, v in figures if v is not None]), ""]
    mor = ov.get("memory_over_rounds")
    if mor:
        w, warm = mor["window"], mor["warmup"]
        out += [
            f"#### Memory over {mor['rounds']} rounds",
            "",
            table(
                ["figure", "value"],
                [
                    ("clients", mor["num_clients"]),
                    ("training images", f"{mor['train_examples']:,}"),
                    (f"RSS floor (least of {w} rounds), rounds {warm + 1}-{warm + w}",
                     _mib(mor["floor_first"])),
                    (f"RSS floor, rounds {mor['rounds'] - w + 1}-{mor['rounds']}",
                     _mib(mor["floor_last"])),
                    ("floor growth", f"{mor['floor_growth_per_round'] / 1024:+.1f} KiB/round "
                     f"({mor['floor_growth'] / 1024:+.0f} KiB in all)"),
                    ("largest single round above the floor",
                     f"{mor['max_minus_floor'] / 2**20:.1f} MiB"),
                    ("flat (growth under 1/20 of a float32 model per round)", _yes(mor["flat"])),
                ],
            ),
            "",
        ]  # fmt: skip
    ts = ov.get("training_speed")
    if ts:
        out += [
            f"#### Local training alone ({ts[0]['samples']:,} images, median of "
            f"{ts[0]['reps']} reps)",
            "",
            table(
                ["threads", "samples/s", "best samples/s", "us CPU/sample", "load before/after"],
                (
                    [r["threads"], f"{r['samples_per_s']:,.0f}", f"{r['best_samples_per_s']:,.0f}",
                     f"{r['cpu_us_per_sample']:.0f}",
                     f"{r.get('load_before', '-')}/{r.get('load_after', '-')}"]
                    for r in ts
                ),
            ),
            "",
        ]  # fmt: skip
    mvc = ov.get("memory_vs_clients")
    if mvc:
        out += [
            f"#### Memory vs clients ({mvc[0]['rounds']} round(s), fresh processes)",
            "",
            table(
                ["clients", "RSS after data load", "RSS after setup", "RSS at end", "peak",
                 "end - first row", "a model per client would add"],
                (
                    [r["num_clients"], _mib(r["rss_data"]), _mib(r["rss_setup"]),
                     _mib(r["rss_end"]), _mib(r["peak_rss"]),
                     f"{r['extra_vs_first'] / 2**20:+.1f} MiB", _mib(r["model_copies_would_add"])]
                    for r in mvc
                ),
            ),
            "",
        ]  # fmt: skip
    prof = ov.get("profile") or []
    body = [
        [f"`{r['function']}`", r["calls"], fmt(r["tottime"], 3), fmt(r["cumtime"], 3),
         _pct(r["share"])]
        for r in prof
    ]  # fmt: skip
    if body:
        header = ["function", "calls", "own s", "cumulative s", "own share"]
        out += [_details("cProfile of steady rounds: own time", table(header, body)), ""]
    return out


def _flower_md(fl: Mapping[str, Any]) -> list[str]:
    out = ["### The simulator vs Flower's simulation engine (Ray)", ""]
    if fl.get("skipped"):
        return [*out, f"Skipped: {fl['skipped']}.", ""]
    ver = fl.get("versions", {})
    out += _settings(
        [
            ("clients", fl["num_clients"]),
            ("bits", f"`{fl['bits']}`"),
            ("aggregation", fl["aggregation"]),
            ("training images", f"{fl['train_examples']:,}"),
            ("rounds", fl["rounds"]),
            ("flwr / ray", f"{ver.get('flwr', '?')} / {ver.get('ray', '?')}"),
        ]
    )
    body = []
    for r in fl["rows"]:
        if r.get("error"):
            body.append([r["runtime"], "failed: " + r["error"], "", "", "", "", "", "", ""])
            continue
        diff = r.get("max_accuracy_difference")
        body.append(
            [r["runtime"], fmt(r["startup_s"], 3), fmt(r["round_median_s"], 3),
             fmt(r.get("round_vs_simulator"), 3), fmt(r["train_median_s"], 3),
             fmt(r["total_s"], 4), fmt(r.get("total_vs_simulator"), 3),
             f"{100 * r['final_accuracy']:.1f}" + (f" ({fmt(100 * diff, 2)})" if diff is not None else ""),
             f"{r.get('load_before', '-')}/{r.get('load_after', '-')}"]
        )  # fmt: skip
    out += _tbl(
            ["runtime", "startup s", "round s", "round x simulator",
             "client training s per round", "total s", "total x simulator",
             "final accuracy % (largest per-round difference, points)",
             "load before/after"],
            body,
        )  # fmt: skip
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
    """The federated section from ``results["sections"]["federated"]`` (``None``: not run)."""
    if not fed:
        return ["## Federated", "", "Not in this run (`--only federated`).", ""]
    out = ["## Federated", "", "```", *fed.get("commands", [fed.get("command", "")]), "```", ""]
    runs = fed.get("runs") or []
    if len(runs) > 1:
        out += _tbl(
                ["merged run", "created", "load before", "load after"],
                (
                    [", ".join(r.get("parts", [])), r.get("created"), r.get("load_before"),
                     r.get("load_after")]
                    for r in runs
                ),
            )  # fmt: skip
    if fed.get("quick"):
        out += ["**Quick smoke run, tiny sizes.**", ""]
    parts = (("bytes_to_target", _bytes_md), ("overhead", _overhead_md), ("flower", _flower_md))
    for key, render in parts:
        out += render(fed[key]) if fed.get(key) else []
    return out


# --------------------------------------------------------------------------- beyond the paper


def rotation_totals(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Whole-model figures of :func:`fedquant.tools.bench.rotation.rotation_weight_errors`
    rows, one per (granularity, bits): NMSE = sum of MSE x size / sum of variance x size,
    bits/coordinate = payload bits / weights, gain = plain / rotated NMSE."""
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
    """Whole-model figures of :func:`fedquant.tools.bench.entropy.entropy_weight_efficiency`
    rows, one per (rotation, bits): bits per weight of each coder (code-weighted means of
    the layers) and the encoded payload's bytes, packed and with ``entropy="rans"``."""
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


def _rotation_cells(r: Row) -> list[Any]:
    """The cells of :data:`_ROTATION_COLUMNS` for one row of the rotation benchmark."""
    return [
        r["granularity"],
        r["bits"],
        fmt(r["nmse_plain"]),
        fmt(r["nmse_rotated"]),
        _x(r["gain"]),
        f"{r['bpc_plain']:.3f}",
        f"{r['bpc_rotated']:.3f}",
    ]


def _rotation_md(rot: Mapping[str, Any]) -> list[str]:
    syn = rot.get("synthetic", [])
    out = ["### Random rotation (`QuantSpec(rotation=True)`)", ""]
    if syn:
        out += _tbl(
                ["source", "rounding", "B", "NMSE plain", "NMSE rotated", "gain",
                 "rotated / Gaussian", "bits/coord plain", "bits/coord rotated"],
                (
                    [r["source"], r["rounding"], r["bits"], fmt(r["nmse_plain"]),
                     fmt(r["nmse_rotated"]), _x(r["gain"]), fmt(r.get("rotated_vs_gaussian"), 3),
                     f"{r['bpc_plain']:.3f}", f"{r['bpc_rotated']:.3f}"]
                    for r in syn
                ),
            )  # fmt: skip
    for model, rows in rot.get("models", {}).items():
        if not rows:
            continue
        ks = [r["kurtosis"] for r in rows if r.get("kurtosis") is not None]
        out += [
            f"#### {model}: whole model, {rows[0].get('rounding')} rounding",
            "",
            *_settings(
                [("layers' excess kurtosis", f"{min(ks):.2f} to {max(ks):.2f}" if ks else None)]
            ),
            table(_ROTATION_COLUMNS, (_rotation_cells(t) for t in rotation_totals(rows))),
            "",
            _details(
                "per layer",
                table(
                    ["layer", "size", "excess kurtosis", *_ROTATION_COLUMNS],
                    (
                        [f"`{r['layer']}`", f"{r['numel']:,}", fmt(r.get("kurtosis"), 3),
                         *_rotation_cells(r)]
                        for r in rows
                    ),
                ),
            ),
            "",
        ]  # fmt: skip
    if rot.get("speed"):
        out += _op_speed_md(rot["speed"], "melem_per_s", "M elem/s", rot.get("load_before"))
    return out


def _op_speed_md(rows: Sequence[Row], rate: str, rate_label: str, load: str | None) -> list[str]:
    """Speed rows (op, bits, threads, ratio_memcpy, rate) as one table: ratio per thread count,
    and each op's time relative to the first op with the same bits."""
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
    return [
        f"#### Speed on {rows[0]['n']:,} float32 values",
        "",
        *_settings([("load average before", load)]),
        table(
            ["op", "B"]
            + [f"ratio, {t} thread(s)" for t in ths]
            + [rate_label]
            + (["bits/code"] if rate == "mcodes_per_s" else []),
            body,
        ),
        "",
    ]


def _entropy_md(ent: Mapping[str, Any]) -> list[str]:
    syn = ent.get("synthetic", [])
    out = ['### Entropy coding (`QuantSpec(entropy="rans")`)', ""]
    out += _settings([("zstandard (level 3)", ent.get("zstd") or "not installed")])
    if syn:
        out += _tbl(
                ["source", "rotation", "rounding", "B", "entropy", "rANS bits/code",
                 "rANS over entropy", "saving vs B", "zstd (packed)", "zstd (byte/code)"],
                (
                    [r["source"], _yes(r["rotation"]), r["rounding"], r["bits"],
                     fmt(r["entropy"], 4), fmt(r["rans"], 4), _pct(r.get("rans_over_entropy"), 3),
                     _pct(1.0 - r["rans"] / r["bits"]), fmt(r.get("zstd_packed"), 4),
                     fmt(r.get("zstd_bytes_per_code"), 4)]
                    for r in syn
                ),
            )  # fmt: skip
    for model, rows in ent.get("models", {}).items():
        if not rows:
            continue
        out += [
            f"#### {model}: whole model, {rows[0].get('rounding')} rounding",
            "",
            table(
                ["rotation", "B", "entropy", "rANS bits/weight", "zstd (packed)",
                 "payload packed B", "payload rANS B", "payload saving"],
                (
                    [_yes(t["rotation"]), t["bits"], fmt(t.get("entropy"), 4),
                     fmt(t.get("rans"), 4), fmt(t.get("zstd_packed"), 4),
                     _bytes(t.get("payload_packed")), _bytes(t.get("payload_rans")),
                     _pct(t.get("saving"))]
                    for t in entropy_totals(rows)
                ),
            ),
            "",
            _details(
                "per layer",
                table(
                    ["layer", "rotation", "B", "entropy", "rANS", "zstd (packed)",
                     "zstd (byte/code)"],
                    (
                        [f"`{r['layer']}`", _yes(r["rotation"]), r["bits"], fmt(r["entropy"], 4),
                         fmt(r["rans"], 4), fmt(r.get("zstd_packed"), 4),
                         fmt(r.get("zstd_bytes_per_code"), 4)]
                        for r in rows
                        if r["layer"] != "(payload)"
                    ),
                ),
            ),
            "",
        ]  # fmt: skip
    if ent.get("speed"):
        out += _op_speed_md(ent["speed"], "mcodes_per_s", "M codes/s", ent.get("load_before"))
    return out


def _allocation_md(al: Mapping[str, Any]) -> list[str]:
    out = ['### Adaptive bit allocation (`bits="auto:B"`)', ""]
    for model, rows in al.get("models", {}).items():
        layers = list(dict.fromkeys(k for r in rows for k in r["bits"]))
        header = (
            ["spec", "at the budget of"]
            + [f"`{k}`" for k in layers]
            + ["bits/weight", "bytes", "sq error", "sq error x fixed", "encode ms",
               "encode x fixed"]
        )  # fmt: skip
        body = [
            [f"`{r['spec']}`", f"`{r['budget_of']}`"]
            + [str(r["bits"].get(k, "-")) for k in layers]
            + [f"{r['bits_per_weight']:.4f}", _bytes(r["bytes"]), fmt(r["sq_error"]),
               fmt(r.get("sq_error_ratio"), 3), fmt(r["encode_ms"], 3),
               fmt(r.get("encode_ratio"), 3)]
            for r in rows
        ]  # fmt: skip
        if body:
            out += [f"#### {model}", "", *_tbl(header, body)]
    return out


def beyond_markdown(sec: Mapping[str, Any]) -> list[str]:
    """The beyond-the-paper section from ``results["sections"]["beyond"]``."""
    out = ["## Beyond the paper: rotation, entropy coding, adaptive bit allocation", ""]
    out += _settings(
        [
            ("synthetic samples", f"{sec['n']:,}" if sec.get("n") else None),
            ("speed: float32 elements", f"{sec['n_speed']:,}" if sec.get("n_speed") else None),
            ("speed: timed reps", sec.get("reps")),
        ]
    )
    out += _weights_table(sec.get("weights") or {})
    parts = (("rotation", _rotation_md), ("entropy", _entropy_md), ("allocation", _allocation_md))
    for key, render in parts:
        out += render(sec[key]) if sec.get(key) else []
    if sec.get("skipped"):
        out += ["Skipped: " + "; ".join(sec["skipped"]), ""]
    return out


def beyond_headline(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(figure, value) pairs of the beyond-the-paper section: rotation on Student-t(3) and on
    the model weights at 4 bits, rANS at 2 bits, allocation at 4-2-2-4's budget."""
    sec = results.get("sections", {}).get("beyond")
    if not sec:
        return []
    out: list[tuple[str, str]] = []
    rot = sec.get("rotation") or {}
    syn = rot.get("synthetic") or []
    rnd = _rounding_of(syn)
    r = _pick(syn, source="student-t3", bits=4, rounding=rnd)
    if r:
        out.append(
            (f"rotation, Student-t(3), B=4, {rnd}: NMSE plain -> rotated (gain), bits/coord",
             f"{fmt(r['nmse_plain'], 3)} -> {fmt(r['nmse_rotated'], 3)} ({_x(r['gain'])}), "
             f"{r['bpc_rotated']:.3f}")
        )  # fmt: skip
    for model, rows in (rot.get("models") or {}).items():
        t = _pick(rotation_totals(rows), granularity="tensor", bits=4)
        if t and t["gain"] is not None:
            out.append(
                (f"rotation, {model} weights, per tensor, B=4, {t['rounding']}: NMSE plain -> "
                 "rotated (gain)",
                 f"{fmt(t['nmse_plain'], 3)} -> {fmt(t['nmse_rotated'], 3)} ({_x(t['gain'])})")
            )  # fmt: skip
    ent = sec.get("entropy") or {}
    esyn = ent.get("synthetic") or []
    rnd = _rounding_of(esyn)
    r = _pick(esyn, source="gaussian", bits=2, rounding=rnd, rotation=False)
    if r:
        out.append(
            (f"rANS, 2-bit OCTAV codes of a Gaussian, {rnd}: bits/code (entropy; zstd-3 packed)",
             f"{fmt(r['rans'], 4)} ({fmt(r['entropy'], 4)}; {fmt(r.get('zstd_packed'), 4)})")
        )  # fmt: skip
    for model, rows in (ent.get("models") or {}).items():
        t = _pick(entropy_totals(rows), bits=2, rotation=False)
        if t and t.get("saving") is not None:
            out.append(
                (f"rANS, {model} payload, B=2: bytes packed -> rANS (saved)",
                 f"{_bytes(t['payload_packed'])} -> {_bytes(t['payload_rans'])} "
                 f"({_pct(t['saving'])})")
            )  # fmt: skip
    for model, rows in ((sec.get("allocation") or {}).get("models") or {}).items():
        auto = next(
            (x for x in rows if x["budget_of"] == "4-2-2-4" and x["spec"] != "4-2-2-4"), None
        )
        if auto and auto.get("sq_error_ratio") is not None:
            out.append(
                (f"`auto` at 4-2-2-4's budget, {model}: widths, bits/weight, sq error x 4-2-2-4",
                 "-".join(str(b) for b in auto["bits"].values())
                 + f", {auto['bits_per_weight']:.3f}, {fmt(auto['sq_error_ratio'], 3)}")
            )  # fmt: skip
    return out


def write_markdown(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write :func:`markdown` of ``results`` to ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(markdown(results))
    return p
