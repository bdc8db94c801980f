"""``fedquant reproduce``: the grid file, resumable runs, locks, and the report's verdicts."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedquant.cli import main as cli_main
from fedquant.errors import ConfigError
from fedquant.fl.client import state_numpy
from fedquant.fl.models import PaperCNN
from fedquant.fl.simulation import TIMING_KEYS, Simulation
from fedquant.tools.reproduce import claims, report, results
from fedquant.tools.reproduce.grid import ENV_FIELDS, Job, expand, load_grid
from fedquant.tools.reproduce.runner import run_job, run_jobs, stratified_subset
from fedquant.tools.runner import LOCK, job_status, read_invocations, source_fingerprint

GRID = Path(__file__).resolve().parents[1] / "experiments" / "paper-claims.toml"
#: the input shape of each data set of the grid (channels, height, width)
SHAPES = {"mnist-embedded": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10-jpeg": (3, 32, 32)}


# --------------------------------------------------------------------------- the grid file


def test_grid_every_cell_validates_on_every_scale() -> None:
    grid = load_grid(GRID)
    assert {"small", "paper", "tiny"} <= set(grid.scales)
    assert {d.name for d in grid.datasets} == set(SHAPES)
    for scale in grid.scales:
        jobs = expand(grid, scale, data_dir="/data")  # builds and validates every RunConfig
        names = grid.scales[scale].cells or [c.name for c in grid.cells]
        per_seed = sum(len(grid.cell(n).datasets or grid.datasets) for n in names)
        assert len(jobs) == per_seed * len(grid.scales[scale].seeds)
        runs = [j for j in jobs if j.alias_of is None]
        assert len({j.fingerprint for j in runs}) == len(runs)  # no two runs compute the same
        for j in jobs:
            # the bits fit the model of the data set (what Simulation checks in round 0)
            state = state_numpy(PaperCNN(SHAPES[j.dataset], 10))
            j.config.uplink_spec().resolve(
                {k: (v.shape, v.dtype.kind == "f") for k, v in state.items()}
            )
            if j.config.data_root is not None:
                assert j.config.data_root.startswith("/data/")


def test_grid_has_the_issue_comparisons_and_the_paper_settings() -> None:
    grid = load_grid(GRID)
    names = [c.name for c in grid.cells]
    assert set(claims.CLAIM_CELLS) <= set(names)
    small = {j.key: j for j in expand(grid, "small")}
    paper = {j.key: j for j in expand(grid, "paper")}
    assert len(grid.scales["small"].seeds) >= 3 and len(grid.scales["paper"].seeds) >= 3
    # the paper's reference settings (../shared/ANCHORS.md)
    p = paper["cifar10-jpeg/base/seed0"].config
    assert (p.num_clients, p.rounds, p.epochs, p.batch_size) == (30, 200, 1, 64)
    assert (p.lr, p.momentum, p.weight_decay) == (0.01, 0.9, 1e-4)
    assert paper["mnist-embedded/base/seed0"].config.bits == "4-2-2-4"
    assert p.bits == "4"
    assert (p.method, p.rounding, p.aggregation, p.partition) == (
        "octav",
        "stochastic",
        "inverse-mse",
        "iid",
    )
    s = small["fashion-mnist/dir-nearest/seed2"].config
    assert (s.partition, s.alpha, s.rounding, s.threads) == ("dirichlet", 0.5, "nearest", 1)
    assert small["fashion-mnist/octav-paper-bits2/seed0"].config.method == "octav-paper"
    assert small["mnist-embedded/fp32-fedavg/seed0"].config.bits == "32"
    # settings equal to an earlier cell's are not run twice
    assert small["mnist-embedded/bits4224/seed0"].alias_of == "base"
    assert small["cifar10-jpeg/bits4/seed1"].alias_of == "base"
    assert small["cifar10-jpeg/bits4224/seed1"].alias_of is None


def test_fingerprint_ignores_where_and_how_fast() -> None:
    grid = load_grid(GRID)
    a = expand(grid, "tiny", cells=["base"])
    b = expand(
        grid,
        "tiny",
        cells=["base"],
        data_dir="/elsewhere",
        overrides={"threads": 2, "device": "cpu"},
    )
    assert [j.fingerprint for j in a] == [j.fingerprint for j in b]
    assert all(k not in j.settings for j in a for k in ENV_FIELDS)
    assert b[0].config.threads == 2


def _grid_file(tmp_path: Path, cells: str, scale: str = "", name: str = "g.toml") -> Path:
    p = tmp_path / name
    p.write_text(
        "[defaults]\nmethod = 'octav'\nbits = 'paper'\n"
        "[datasets.mnist-embedded]\ntitle = 'MNIST (embedded)'\npaper_bits = '4-2-2-4'\n"
        "[scales.tiny]\nseeds = [0]\nnum_clients = 2\nrounds = 2\nsamples_per_client = 24\n"
        f"test_samples = 40\nsubset_seed = 1\nthreads = 1\n{scale}"
        f"[cells]\n{cells}\n"
    )
    return p


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        ("x = { bogus = 1 }", "cells.x.bogus: unknown key"),
        ("x = { seed = 3 }", "cells.x.seed: is set by the scale or the command"),
        ("x = { threads = 3 }", "cells.x.threads: is set by the scale or the command"),
        ("x = { rounding = 'up' }", "g.toml: mnist-embedded/x: rounding: 'up' is not valid"),
        ("x = { bits = '4-9' }", "mnist-embedded/x: bits: '4-9' is not valid"),
        ("x = 3", "cells.x: must be a table"),
        ("x = { datasets = ['svhn'] }", r"cells.x.datasets: \['svhn'\] is not a non-empty list"),
        ("x = { datasets = [] }", "cells.x.datasets: .* of the grid's data sets"),
        ("", "cells: .* defines no cell"),
    ],
)
def test_grid_errors_name_the_key(tmp_path: Path, cells: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        expand(load_grid(_grid_file(tmp_path, cells)), "tiny")


def test_cell_datasets_limit_where_a_cell_runs() -> None:
    grid = load_grid(GRID)
    jobs = expand(grid, "small")
    where = {j.dataset for j in jobs if j.cell == "channel"}
    assert where == {"mnist-embedded", "cifar10-jpeg"}
    assert {j.dataset for j in jobs if j.cell == "base"} == {d.name for d in grid.datasets}
    assert expand(grid, "small", datasets=["fashion-mnist"], cells=["channel"]) == []


def test_grid_unknown_names(tmp_path: Path) -> None:
    grid = load_grid(_grid_file(tmp_path, "base = {}"))
    with pytest.raises(ConfigError, match=r"--scale: 'huge' is not in .*expected one of: tiny"):
        expand(grid, "huge")
    with pytest.raises(ConfigError, match="--datasets: 'svhn' is not in"):
        expand(grid, "tiny", datasets=["svhn"])
    with pytest.raises(ConfigError, match="--cells: 'nope' is not a cell"):
        expand(grid, "tiny", cells=["nope"])
    with pytest.raises(ConfigError, match="--grid: '/nonexistent.toml' does not exist"):
        load_grid("/nonexistent.toml")
    bad_seeds = _grid_file(tmp_path, "base = {}", name="s.toml").read_text()
    (tmp_path / "s.toml").write_text(bad_seeds.replace("seeds = [0]", "seeds = [1, 1]"))
    with pytest.raises(ConfigError, match=r"scales.tiny.seeds: \[1, 1\] repeats a seed"):
        load_grid(tmp_path / "s.toml")


# --------------------------------------------------------------------------- data subsets


def test_stratified_subset_keeps_class_shares() -> None:
    y = np.repeat(np.arange(10), np.arange(10, 110, 10))  # class k has 10(k+1) images
    idx = stratified_subset(y, 110, seed=3)
    assert idx.size == 110 and np.all(np.diff(idx) > 0)  # sorted, no repeats
    # share of class k is (k+1)/55 -> 2(k+1) of 110, exactly (no remainders here)
    assert np.bincount(y[idx]).tolist() == [2 * (k + 1) for k in range(10)]
    assert np.array_equal(idx, stratified_subset(y, 110, seed=3))
    assert not np.array_equal(idx, stratified_subset(y, 110, seed=4))
    odd = stratified_subset(y, 37, seed=0)  # largest remainders: total exact, each within 1
    assert odd.size == 37
    assert np.all(np.abs(np.bincount(y[odd], minlength=10) - 37 * np.arange(1, 11) / 55) < 1)
    assert stratified_subset(y, 0, seed=0).size == y.size
    assert stratified_subset(y, 10_000, seed=0).size == y.size


# --------------------------------------------------------------------------- running


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _metrics(d: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def test_two_cells_end_to_end_then_skip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = _grid_file(tmp_path, "fp32-fedavg = { bits = '32', aggregation = 'fedavg' }\nbase = {}")
    argv = ["reproduce", "--grid", str(grid), "--scale", "tiny", "--out", str(tmp_path / "out")]
    assert cli_main([*argv, "--jobs", "0"]) == 0
    out = capsys.readouterr().out
    assert "[   2/2] done" in out and "report:" in out
    raw = tmp_path / "out" / "claims-tiny" / "raw"
    for cell in ("fp32-fedavg", "base"):
        d = raw / "mnist-embedded" / cell / "seed0"
        names = {p.name for p in d.iterdir()}
        assert {"cell.json", "config.toml", "metrics.jsonl", "summary.json"} <= names
        assert "checkpoint.npz" not in names and LOCK not in names  # small, committable
        s = json.loads((d / "summary.json").read_text())
        assert s["rounds"] == 2 and s["train_samples"] == 48 and s["test_samples_per_round"] == 40
        assert s["final_accuracy_test_samples"] == 1000  # the final accuracy: whole test split
        assert 0.0 <= s["final_accuracy"] <= 1.0
        assert 0.0 < s["cpu_seconds"] and len(s["source_sha256"]) == 16
    base = json.loads((raw / "mnist-embedded/base/seed0/summary.json").read_text())
    fp32 = json.loads((raw / "mnist-embedded/fp32-fedavg/seed0/summary.json").read_text())
    # measured payloads: float32 plus the self-describing header is a little over 330,136
    assert 0.99 < fp32["uplink_ratio_vs_float32"] < 1.0
    # the paper CNN at 4-2-2-4 is 24,927 bytes (README); the round number in the header may
    # take a digit less
    assert abs(base["uplink_bytes_per_client_round"] - 24_927) <= 2
    md = (tmp_path / "out" / "claims-tiny" / "README.md").read_text()
    assert "Status: complete" in md and "MNIST (embedded)" in md
    assert "Code: fedquant source" in md and "OUTDATED" not in md
    assert "/work/" not in md.split("## Verdicts")[0]  # a commit, not a local path
    inv = read_invocations(raw)
    assert len(inv) == 1 and inv[0]["status"] == "finished" and inv[0]["results"] == {"done": 2}
    # which code and environment: the git commit, versions and CPU, recorded and shown
    assert inv[0]["source_commit"] and f"commit `{inv[0]['source_commit']}`" in md
    assert inv[0]["environment"]["numpy"] == np.__version__ and "pythonpath" not in inv[0]
    assert f"Environment: python {inv[0]['environment']['python']}" in md
    assert inv[0]["cpu_seconds"] > 0 and inv[0]["source_sha256"] == s["source_sha256"]
    assert inv[0]["argv"] == [
        f"fedquant reproduce --scale tiny --grid {grid} --out {tmp_path / 'out'} --jobs 0"
    ]

    assert "checkpoint.npz" in (raw / ".gitignore").read_text().split()
    mtimes = {p: p.stat().st_mtime_ns for p in raw.rglob("summary.json")}
    assert cli_main([*argv, "--jobs", "0", "--no-report"]) == 0  # second run: nothing to do
    assert "done" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("summary.json")} == mtimes
    assert len(read_invocations(raw)) == 1  # no record for an invocation that ran nothing


def test_beyond_section_compares_with_the_reference_cell(tmp_path: Path) -> None:
    grid = _grid_file(tmp_path, "base = {}\nrans = { entropy = 'rans' }")
    argv = ["reproduce", "--grid", str(grid), "--scale", "tiny", "--out", str(tmp_path / "o")]
    assert cli_main([*argv, "--jobs", "0", "--quiet"]) == 0
    md = (tmp_path / "o" / "claims-tiny" / "README.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| MNIST (embedded) | rANS"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    # rANS is lossless: the same seed trains the same models, so the accuracy is identical ...
    assert cols[2] == "`rans` − `base`" and cols[3] == "+0.00 (1 seed)"
    # ... and only the bytes change: fewer of them
    assert 0.5 < float(cols[6]) < 1.0
    assert cols[7].startswith("conv1 1.00")  # the same codes, so the same measured MSE


def _tiny_job(tmp_path: Path) -> Job:
    return expand(load_grid(_grid_file(tmp_path, "base = {}", name="r.toml")), "tiny")[0]


def test_interrupted_job_resumes_to_the_same_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _tiny_job(tmp_path)
    whole = run_job(job, tmp_path / "a")
    assert whole.status == "done" and whole.resumed_from == 0

    original = Simulation.run_round
    calls = {"n": 0}

    def stop_in_round_2(self: Simulation, state: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # like Ctrl-C: the lock is released, the checkpoint stays
        return original(self, state)

    monkeypatch.setattr(Simulation, "run_round", stop_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_job(job, tmp_path / "b")
    monkeypatch.setattr(Simulation, "run_round", original)
    d = job.directory(tmp_path / "b")
    assert (d / "checkpoint.npz").exists() and not (d / LOCK).exists()
    assert job_status(job, tmp_path / "b") == "partial"

    again = run_job(job, tmp_path / "b")
    assert again.status == "done" and again.resumed_from == 1
    assert _strip(_metrics(d)) == _strip(_metrics(job.directory(tmp_path / "a")))
    assert again.final_accuracy == whole.final_accuracy
    assert not (d / "checkpoint.npz").exists()
    assert run_job(job, tmp_path / "b").status == "skipped"


def test_locks_and_stale_results(tmp_path: Path) -> None:
    job = _tiny_job(tmp_path)
    d = job.directory(tmp_path)
    d.mkdir(parents=True)
    import socket

    host = socket.gethostname()
    (d / LOCK).write_text(f"{host} {os.getppid()}\n")  # a live process holds it
    assert job_status(job, tmp_path) == "running"
    assert run_job(job, tmp_path).status == "busy"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / LOCK).write_text(f"{host} {dead.pid}\n")  # its holder is gone: taken over
    assert run_job(job, tmp_path).status == "done"
    assert job_status(job, tmp_path) == "done"

    # the grid changes (another learning rate): the old result is stale, rerun and replaced
    grid = load_grid(_grid_file(tmp_path, "base = { lr = 0.02 }", name="r2.toml"))
    changed = expand(grid, "tiny")[0]
    assert changed.fingerprint != job.fingerprint and changed.directory(tmp_path) == d
    assert job_status(changed, tmp_path) == "stale"
    assert run_job(changed, tmp_path).status == "done"
    assert json.loads((d / "cell.json").read_text())["fingerprint"] == changed.fingerprint
    assert job_status(job, tmp_path) == "stale"


def test_runs_of_other_code_are_outdated(tmp_path: Path) -> None:
    job = _tiny_job(tmp_path)
    out = tmp_path / "rep"
    raw = out / "raw"
    assert run_job(job, raw).status == "done"
    summary = job.directory(raw) / "summary.json"
    current = json.loads(summary.read_text())["source_sha256"]
    assert current == source_fingerprint() and job_status(job, raw, current) == "done"
    old = json.loads(summary.read_text())
    summary.write_text(json.dumps({**old, "source_sha256": "0" * 16}))  # made by other code
    assert job_status(job, raw) == "done"  # settings unchanged ...
    assert job_status(job, raw, current) == "outdated"  # ... but not by this code
    assert run_job(job, raw).status == "skipped"  # kept when asked to
    assert run_jobs([job], raw, rerun_outdated=False, in_process=True) == []
    # the report says so
    md = report.write_report(
        load_grid(tmp_path / "r.toml"), "tiny", out, figures=False, current_source=current
    ).read_text()
    assert "**OUTDATED: 1 of 1 runs were computed by another source" in md
    assert f"`{'0' * 16}` (1 runs; commit `not recorded`)" in md
    # by default, rerun
    (r,) = run_jobs([job], raw, in_process=True)
    assert r.status == "done" and job_status(job, raw, current) == "done"
    inv = read_invocations(raw)[-1]
    assert inv["source_sha256"] == current and "source_path" not in inv


@pytest.mark.slow
def test_parallel_workers(tmp_path: Path) -> None:
    grid = load_grid(_grid_file(tmp_path, "base = {}\nnearest = { rounding = 'nearest' }"))
    jobs = expand(grid, "tiny")
    seen: list[str] = []
    results = run_jobs(jobs, tmp_path, n_jobs=2, on_result=lambda r, k, n: seen.append(r.key))
    assert sorted(r.status for r in results) == ["done", "done"]
    assert sorted(seen) == sorted(j.key for j in jobs)
    assert all(job_status(j, tmp_path) == "done" for j in jobs)
    assert read_invocations(tmp_path)[0]["jobs"] == 2


def test_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["reproduce", "--grid", str(GRID), "--scale", "huge"]) == 2
    assert "--scale: 'huge' is not in" in capsys.readouterr().err
    argv = ["reproduce", "--grid", str(GRID), "--scale", "tiny", "--datasets", "cifar10-jpeg"]
    assert cli_main([*argv, "--data-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--data-dir:" in err and "cifar10-jpeg.tar.gz" in err and "FEDQUANT_DATA" in err
    with pytest.raises(SystemExit) as e:
        cli_main(["reproduce", "--jobs", "x"])
    assert e.value.code == 2
    assert cli_main([*argv, "--list", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "missing  cifar10-jpeg/base/seed0" in out
    assert "alias    cifar10-jpeg/bits4/seed0 (= base)" in out


# --------------------------------------------------------------------------- statistics


def test_paired_difference_and_interval() -> None:
    d = results.paired_diff({0: 91.0, 1: 92.0, 2: 96.0}, {0: 90.0, 1: 90.0, 2: 90.0, 7: 1.0})
    assert d is not None and d.n == 3  # seed 7 has no partner
    assert math.isclose(d.mean, 3.0) and math.isclose(d.sd, math.sqrt(7.0))
    half = 4.303 * math.sqrt(7.0) / math.sqrt(3)  # t(0.975, 2 df) = 4.303
    assert math.isclose(d.lo, 3.0 - half) and math.isclose(d.hi, 3.0 + half)
    assert not d.resolved  # the interval [-3.6, 9.6] holds 0
    one = results.paired_diff({0: 2.0}, {0: 1.0})
    assert one is not None and one.n == 1 and not one.resolved and "1 seed" in one.fmt()
    assert results.paired_diff({0: 1.0}, {1: 1.0}) is None
    assert results.t975(1) == 12.706 and results.t975(100) == 1.96
    assert claims.combine([claims.HELD, claims.NOT_MEASURED]) == claims.HELD
    assert claims.combine([claims.HELD, claims.NOT_HELD]) == claims.NOT_HELD
    assert claims.combine([claims.INCONCLUSIVE, claims.NOT_HELD]) == claims.NOT_HELD
    assert claims.combine([claims.INCONCLUSIVE, claims.INCONCLUSIVE]) == claims.INCONCLUSIVE
    assert claims.combine([claims.NOT_MEASURED]) == claims.NOT_MEASURED


# --------------------------------------------------------------------------- the report

#: designed final accuracies (%) on the fixture: each claim lands on a known verdict
_ACC = {
    "fp32-fedavg": 90.0,
    "base": 89.6,  # (a) -0.4: held at the paper bits
    "nearest": 86.6,  # (b) +3.0: held
    "maxabs": 84.6,  # (c) +5.0: held
    "maxabs-nearest": 81.6,  # (c) nearest - this = +5.0: held; (b) maxabs - this = +3.0
    "fedavg": 92.6,  # (d) -3.0: did not hold (more than 1 pp below)
    "bits2": 85.0,  # (a) -5.0: not near, resolved
    "bits2-nearest": 84.0,  # (b) +1.0: held (a gain), below the claimed 2 pp
    "bits3": 89.9,
    "bits4": 90.2,
    "bits8": 90.0,
    "bits4224": 89.6,
    "octav-paper": 89.6,  # coefficient: no resolved difference
    "octav-paper-bits2": 85.0,
    "dir-fp32-fedavg": 80.0,
    "dir-base": 79.5,  # (a) -0.5: held
    "dir-fedavg": 79.0,  # (d) +0.5: held
    "dir-nearest": 76.5,  # (b) +3.0: held
}


_CLAIMS = """
[claims]
alpha = 0.05
a = { test = "equivalence", margin = 1.0, min_ratio = 4.0 }
b = { test = "superiority", margin = 0.0, claimed_gain = 2.0 }
c = { test = "superiority", margin = 0.0 }
d = { test = "non-inferiority", margin = 1.0 }
"""


def _fixture_raw(tmp_path: Path, drop: str | None = None) -> tuple[Any, Path]:
    # distinct settings per cell, so none is an alias of another
    cells = "\n".join(f"{c} = {{ lr = {0.001 * (i + 1):.3f} }}" for i, c in enumerate(_ACC))
    g = _grid_file(tmp_path, cells)
    text = g.read_text().replace("seeds = [0]", "seeds = [0, 1, 2, 3, 4]")
    g.write_text(text + _CLAIMS)
    grid = load_grid(g)
    out = tmp_path / "report"
    rng = np.random.default_rng(0)
    for j in expand(grid, "tiny"):
        if j.key == drop:
            continue
        d = j.directory(out / "raw")
        d.mkdir(parents=True)
        acc = _ACC[j.cell] + 0.7 * j.seed + float(rng.normal(0, 0.05))  # seed effect + noise
        bytes_ = 330_136 if "fp32" in j.cell else 24_927
        (d / "cell.json").write_text(json.dumps({"fingerprint": j.fingerprint}))
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "final_accuracy": acc / 100,
                    "final_accuracy_test_samples": 1000,
                    "train_samples": 48,
                    "uplink_bytes_per_client_round": bytes_,
                    "uplink_ratio_vs_float32": 330_136 / bytes_,
                    "total_uplink_bytes": 2 * 2 * bytes_,
                    "compute_seconds": 3.0,
                }
            )
        )
        rows = [
            {
                "round": r,
                "test_accuracy": (acc - 10 * (2 - r)) / 100,
                "cum_uplink_bytes": 2 * r * bytes_,
                "mse": {}
                if "fp32" in j.cell
                else {"fc1.weight": 1e-4 * (2 if "paper" in j.cell else 1)},
            }
            for r in (1, 2)
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return grid, out


def test_report_verdicts_on_fixture_results(tmp_path: Path) -> None:
    grid, out = _fixture_raw(tmp_path)
    c = results.collect(grid, "tiny", out / "raw")
    assert c.complete
    verdicts = {r.key: r for r in claims.evaluate_claims(c)}
    assert verdicts["a"].verdict == claims.NOT_HELD  # bits2 is 5 points below, resolved
    assert verdicts["b"].verdict == claims.HELD  # every gain resolved
    assert "3 of 3 90 % intervals" not in verdicts["b"].summary  # +1.0 is below 2 pp
    assert "2 of 3 90 % intervals lie above 2 pp" in verdicts["b"].summary
    assert verdicts["c"].verdict == claims.HELD
    assert verdicts["d"].verdict == claims.NOT_HELD  # IID -3.0, Dirichlet +0.5
    assert verdicts["coef"].verdict == "no resolved change in accuracy"
    b_rows = {(r.a, r.b): r for r in verdicts["b"].rows}
    assert b_rows[("base", "nearest")].outcome == claims.HELD
    assert b_rows[("bits2", "bits2-nearest")].outcome == claims.HELD
    assert b_rows[("base", "nearest")].tested.n == 5  # type: ignore[union-attr]
    d_rows = {r.what: r.outcome for r in verdicts["d"].rows}
    assert d_rows == {"IID": claims.NOT_HELD, "Dirichlet(0.5)": claims.HELD}
    a_rows = {r.a: r for r in verdicts["a"].rows}
    assert a_rows["bits2"].outcome == claims.NOT_HELD
    assert a_rows["bits8"].outcome == claims.INFO  # outside the claim's 2-4 bits
    assert not a_rows["dir-base"].counted and a_rows["dir-fedavg"].b == "dir-fp32-fedavg"
    assert "uplink 13.2x smaller" in a_rows["base"].note
    assert claims.mse_ratio(c, "mnist-embedded", "base", "octav-paper") == {"fc1.weight": 0.5}

    path = report.write_report(grid, "tiny", out)
    md = path.read_text()
    assert "**Status: complete** — 90 of 90 runs finished." in md
    assert "Holm's correction over claims (a)–(d), family-wise α = 0.05; intervals 90 %." in md
    assert "| (a) | equivalence within ±1 pp (TOST) |" in md
    assert "| (c) OCTAV clipping beats max-abs scaling | **held** |" in md
    assert "| (d) inverse-MSE averaging matches or beats FedAvg" in md
    # the robustness check (mean of the last evaluations) agrees on the fixture: same offsets
    robust = {r.key: r.verdict for r in claims.evaluate_claims(c, results.LAST_EVALS)}
    assert robust == {k: r.verdict for k, r in verdicts.items()}
    assert "verdict on the mean of the last 3 evaluations" in md
    assert "| (c) OCTAV clipping beats max-abs scaling | **held** |" in md
    # every figure is there and named after its data set
    for kind in ("accuracy-vs-round", "accuracy-vs-uplink", "final-accuracy"):
        png = out / f"mnist-embedded-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![MNIST (embedded): " in md and f"({png.name})" in md
    assert "### MNIST (embedded)" in md
    assert "24,927" in md and "13.24x" in md


def test_report_says_partial(tmp_path: Path) -> None:
    grid, out = _fixture_raw(tmp_path, drop="mnist-embedded/nearest/seed1")
    md = report.write_report(grid, "tiny", out, figures=False).read_text()
    assert "**Status: PARTIAL — 89 of 90 runs finished (1 missing)" in md
    assert "`mnist-embedded/nearest/seed1`" in md
    nearest = [
        r for r in claims.evaluate_claims(results.collect(grid, "tiny", out / "raw"))[1].rows
    ]
    assert next(r for r in nearest if r.b == "nearest").diff.n == 4  # type: ignore[union-attr]


def _unstamped(md: str) -> list[str]:
    """The page without what depends on when and by which code it was written."""
    return [
        line
        for line in md.splitlines()
        if not line.startswith("*Generated by ") and not line.startswith("This page was written")
    ]


@pytest.mark.parametrize("scale", ["small", "medium"])
def test_committed_report_regenerates_from_its_raw_data(tmp_path: Path, scale: str) -> None:
    committed = Path(__file__).resolve().parents[1] / "docs" / "results" / f"claims-{scale}"
    out = tmp_path / f"claims-{scale}"
    out.mkdir()
    for p in [committed / "raw", *committed.glob("*.png")]:  # figures are linked, not redrawn
        (out / p.name).symlink_to(p)
    md = report.write_report(load_grid(GRID), scale, out, figures=False).read_text()
    assert _unstamped(md) == _unstamped((committed / "README.md").read_text())
    # the seed-level data and the seeds an inconclusive comparison needs, recomputed here
    from fedquant.tools.reproduce.stats import Hypothesis, seeds_to_resolve

    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in md.splitlines()
        if "− `fp32-fedavg` |" in line and "Dirichlet" not in line
    ]
    assert len(rows) == 15  # claim (a): 5 IID bit widths on each of 3 data sets
    checked = 0
    for cells in rows:
        if cells[6] != "inconclusive" or not cells[7].isdigit():
            continue
        per_seed = [float(v) for v in cells[4].split(", ")]
        n = len(per_seed)
        assert n == len(load_grid(GRID).scales[scale].seeds)
        mean = sum(per_seed) / n
        sd = (sum((v - mean) ** 2 for v in per_seed) / (n - 1)) ** 0.5
        # 33 counted comparisons, two hypotheses each: Holm's strictest level is 0.05 / 66
        need = seeds_to_resolve(mean, sd, Hypothesis("equivalence", 1.0), 0.05 / 66)
        assert need is not None
        assert abs(int(cells[7]) - need) <= max(1, need // 20)  # per-seed values are rounded
        checked += 1
    assert checked > 0
    # the precision line agrees with the per-claim counts and the 90 % intervals shown
    verdicts = [line for line in md.splitlines() if re.match(r"\| \([a-d]\) ", line)]
    held_or_not = sum(
        int(m.group(1)) + int(m.group(2))
        for line in verdicts
        for m in [re.search(r"(\d+) held, (\d+) did not hold, \d+ inconclusive of \d+", line)]
        if m is not None
    )
    line = next(x for x in md.splitlines() if x.startswith("Precision achieved: "))
    assert f"33 counted comparisons, {held_or_not} resolved;" in line
    half = [
        (float(m.group(2)) - float(m.group(1))) / 2
        for x in md.split("## The claims, comparison by comparison")[1]
        .split("### Our corrected")[0]
        .splitlines()
        if x.startswith("| ") and "not counted" not in x
        for m in [re.search(r"\[([-+]\d+\.\d+), ([-+]\d+\.\d+)\] \| [-+]", x)]
        if m is not None
    ]
    assert len(half) == 33
    median = sorted(half)[16]
    shown = re.search(r"interval half-width median (\d+\.\d+) pp \(largest (\d+\.\d+)\)", line)
    assert shown is not None
    assert abs(float(shown.group(1)) - median) <= 0.011  # bounds are rounded to 0.01
    assert abs(float(shown.group(2)) - max(half)) <= 0.011
    # the cell table lists the cells the scale runs
    run = load_grid(GRID).scales[scale].cells
    setup = md.split("## Set-up")[1].split("## The claims")[0]
    table_cells = re.findall(r"^\| `([a-z0-9-]+)` \|", setup, flags=re.M)
    assert set(table_cells) == set(run or [c.name for c in load_grid(GRID).cells])


def test_precision_line_without_tested_comparisons() -> None:
    assert report._precision_line([]) == "Precision: no counted comparison has two seeds yet."


def test_committed_robustness_table_regenerates_from_its_raw_data(tmp_path: Path) -> None:
    from fedquant.tools.reproduce.robustness import write_robustness_report

    committed = Path(__file__).resolve().parents[1] / "docs" / "results" / "robustness-small"
    out = tmp_path / "robustness-small"
    out.mkdir()
    (out / "raw").symlink_to(committed / "raw")
    grid = load_grid(GRID.parent / "robustness.toml")
    md = write_robustness_report(grid, "small", out, "../shared/data").read_text()
    assert _unstamped(md) == _unstamped((committed / "README.md").read_text())
    assert "| clean |" in md and "## The goal" in md


def test_plan_prices_a_scale_and_its_half_widths(capsys: pytest.CaptureFixture[str]) -> None:
    from fedquant.tools.reproduce.power import CostModel, run_cost

    grid = load_grid(GRID)
    medium = {j.key: j for j in expand(grid, "medium")}
    job = medium["fashion-mnist/base/seed0"]
    assert (job.config.num_clients, job.config.client_fraction, job.config.epochs) == (30, 1.0, 1)
    assert len(grid.scales["medium"].seeds) >= 5
    # 3,000 images x 40 rounds, 30 x 40 uploads, 1,000 test images x 10 evaluations, final 10,000
    m = CostModel(1e-4, 1e-3, 1e-5, 1e-5, runs=1)
    expected = 1e-4 * 3000 * 40 + 1e-3 * 30 * 40 + 1e-5 * 1000 * 10 + 1e-5 * 10_000
    assert math.isclose(run_cost(job, m), expected)
    # the plan from the committed small scale
    committed = Path(__file__).resolve().parents[1] / "docs" / "results"
    argv = ["reproduce", "--grid", str(GRID), "--scale", "medium", "--plan", "--jobs", "2"]
    assert cli_main([*argv, "--out", str(committed)]) == 0
    out = capsys.readouterr().out
    assert "255 runs (5 seeds)" in out and "| 5 (this scale) |" in out
    assert "of the 33 counted paired comparisons" in out


def test_robustness_grid_validates_and_covers_every_attack_and_rule() -> None:
    from fedquant.fl.adversary import ATTACKS

    g = load_grid(GRID.parent / "robustness.toml")
    for scale in g.scales:
        jobs = expand(g, scale, data_dir="/nonexistent")
        assert {j.seed for j in jobs} == set(g.scale(scale).seeds)
    small = g.scale("small")
    assert len(small.seeds) >= 3 and small.final_on_subset
    modes = {c.changes.get("hostile_mode") for c in g.cells}
    assert set(ATTACKS) | {"mixed", None} == modes
    fracs = {c.changes.get("hostile_fraction") for c in g.cells}
    assert fracs == {None, 0.1, 0.3}
    rules = {c.changes["aggregation"] for c in g.cells}
    assert rules == {"fedavg", "inverse-mse", "median", "trimmed-mean", "multi-krum"}


def test_robustness_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = _grid_file(
        tmp_path,
        "clean-invmse = { aggregation = 'inverse-mse' }\n"
        "scale6-30-invmse = { aggregation = 'inverse-mse', hostile_fraction = 0.5, "
        "hostile_mode = 'scale-1e6' }",
        scale="final_on_subset = true\n",
    )
    argv = ["robustness", "--grid", str(grid), "--scale", "tiny", "--out", str(tmp_path / "o")]
    assert cli_main([*argv, "--jobs", "0"]) == 0
    out = tmp_path / "o" / "robustness-tiny"
    s = json.loads((out / "raw/mnist-embedded/clean-invmse/seed0/summary.json").read_text())
    assert s["final_accuracy_test_samples"] == 40  # final_on_subset: the per-round subset
    md = (out / "README.md").read_text()
    assert "fedquant robustness --scale tiny" in md
    assert "| clean |" in md and "| scale-1e6, 50 % |" in md
    assert "Not measured yet" in md  # the goal is about 30 %, this grid has 50 %


def test_a_scale_can_run_only_some_cells(tmp_path: Path) -> None:
    grid = load_grid(GRID)
    # the medium scale runs exactly the claim grid: what the verdicts read, nothing else
    assert grid.scales["medium"].cells == claims.CLAIM_CELLS
    medium = expand(grid, "medium")
    assert {j.cell for j in medium} == set(claims.CLAIM_CELLS)
    assert len([j for j in medium if j.alias_of is None]) == 255
    # --cells still picks any cell of the grid
    assert {j.cell for j in expand(grid, "medium", cells=["rotation"])} == {"rotation"}
    g = load_grid(_grid_file(tmp_path, "a = {}\nb = { bits = '2' }", scale="cells = ['b']\n"))
    assert [j.cell for j in expand(g, "tiny")] == ["b"]
    for bad, message in [
        ("cells = ['c']", r"scales.tiny.cells: c is not a cell of .*expected names from \[cells\]"),
        ("cells = []", r"scales.tiny.cells: \[\] is not valid; expected a non-empty list"),
        ("cells = 'a'", r"scales.tiny.cells: 'a' is not valid"),
        ("cells = ['a', 'a']", r"scales.tiny.cells: \['a', 'a'\] is not valid"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_grid(_grid_file(tmp_path, "a = {}\nb = {}", scale=bad + "\n"))


def test_final_on_subset_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scales.tiny.final_on_subset: 'yes' is not valid"):
        load_grid(_grid_file(tmp_path, "x = {}", scale="final_on_subset = 'yes'\n"))
