"""The text-task grid: workload jobs in the reproduce runner, per-tensor errors, its tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fedquant.errors import ConfigError
from fedquant.tools.reproduce.grid import expand, load_grid
from fedquant.tools.reproduce.results import collect
from fedquant.tools.reproduce.runner import run_job, tensor_vnmse
from fedquant.tools.reproduce.text_report import (
    REFERENCES,
    allocated_bits,
    cell_table,
    group_vnmse,
    main,
    tensor_group,
    vnmse_table,
)

GRID = Path(__file__).resolve().parents[1] / "experiments" / "text-task.toml"


def test_tensor_vnmse_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    state = {"w": w, "zeros": np.zeros(5, np.float32), "count": np.array(3, np.int64)}
    out = tensor_vnmse(state, bits=(2, 8))
    assert set(out) == {"2", "8"} and set(out["2"]) == {"w", "zeros"}  # integers skipped
    assert out["2"]["zeros"] == 0.0
    # Gaussian data: OCTAV at 2 bits loses ~12 % of the power, at 8 bits ~1e-4 (both < 1)
    assert 0.05 < out["2"]["w"] < 0.2
    assert out["8"]["w"] < 1e-3
    from fedquant.quant.quantizer import fake_quantize

    q = fake_quantize(w, 2, method="octav", rounding="nearest")
    direct = float(np.sum((q - w.astype(np.float64)) ** 2) / np.sum(w.astype(np.float64) ** 2))
    assert out["2"]["w"] == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("tok_emb.weight", "token embedding (tied head)"),
        ("pos_emb.weight", "position embedding"),
        ("blocks.1.attn.qkv.weight", "attention qkv"),
        ("blocks.0.attn.proj.weight", "attention output"),
        ("blocks.0.out.weight", "MLP (fc, out)"),
        ("blocks.0.ln2.weight", "LayerNorm gains"),
        ("ln_f.bias", "LayerNorm biases"),
        ("blocks.0.attn.qkv.bias", "linear biases"),
        ("conv1.weight", "other"),
    ],
)
def test_tensor_groups(name: str, group: str) -> None:
    assert tensor_group(name) == group


def test_group_vnmse_averages_tensors_and_runs() -> None:
    runs = [
        {"final_model_vnmse": {"2": {"blocks.0.fc.weight": 0.1, "blocks.0.out.weight": 0.3}}},
        {"final_model_vnmse": {"2": {"blocks.0.fc.weight": 0.2, "blocks.0.out.weight": 0.2}}},
        {"no": "table"},
    ]
    assert group_vnmse(runs) == {"MLP (fc, out)": {"2": pytest.approx(0.2)}}


def test_grid_file_is_valid_and_references_exist() -> None:
    grid = load_grid(GRID)
    names = {c.name for c in grid.cells}
    assert {REFERENCES[n] for n in names if n in REFERENCES} <= names
    jobs = expand(grid, "small")
    assert len(jobs) == 3 * len(names)
    cfg = jobs[0].config
    assert (cfg.dataset, cfg.model, cfg.num_clients) == (
        "python-stdlib-text",
        "char-transformer",
        10,
    )


def _grid(tmp_path: Path, samples: int = 0) -> Path:
    text = GRID.read_text()
    head = text[: text.index("[scales.small]")]
    cells = text[text.index("[cells]") :]
    scale = (
        "[scales.test]\nseeds = [0, 1]\nnum_clients = 10\nclient_fraction = 0.2\nrounds = 1\n"
        f"samples_per_client = {samples}\ntest_samples = 0\neval_every = 1\nthreads = 1\n\n"
    )
    p = tmp_path / "grid.toml"
    p.write_text(head + scale + cells)
    return p


def test_workload_job_refuses_a_data_subset(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path, samples=10))
    (job,) = expand(grid, "test", cells=["fp32"], seeds=[0])
    res = run_job(job, tmp_path / "raw")
    assert res.status == "failed"
    assert res.error is not None and "expected samples_per_client = 0" in res.error
    assert ConfigError.__name__ in (tmp_path / "raw" / job.key / "error.txt").read_text()


@pytest.mark.slow
def test_workload_jobs_run_and_tabulate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid_path = _grid(tmp_path)
    grid = load_grid(grid_path)
    raw = tmp_path / "out" / "claims-test" / "raw"
    for job in expand(grid, "test", cells=["fp32", "bits2"]):
        res = run_job(job, raw)
        assert res.status == "done", res.error
        assert res.final_accuracy is not None and 0 <= res.final_accuracy <= 1
    c = collect(grid, "test", raw)
    fp32 = c.get("python-stdlib-text", "fp32")
    assert fp32 is not None and set(fp32.runs) == {0, 1}
    s = fp32.runs[0].summary
    assert s["metric"] == "bits_per_char" and s["higher_is_better"] is False
    assert s["final_bits_per_char"] == pytest.approx(s["final_loss"] / np.log(2))
    assert set(s["final_model_vnmse"]) == {"2", "4", "8"}
    table = cell_table(c, "python-stdlib-text")
    assert "`fp32`" in table and "`bits2`" in table and "vs fp32" in table
    assert main(["--grid", str(grid_path), "--scale", "test", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "vNMSE at 2 bits" in printed and "4 runs" in printed


def _fake_results(tmp_path: Path) -> tuple[Path, Path]:
    """Hand-written results of three cells, two seeds, in the runner's layout."""
    grid_path = _grid(tmp_path)
    grid = load_grid(grid_path)
    raw = tmp_path / "out" / "claims-test" / "raw"
    bpc = {"fp32": (3.0, 3.2), "bits2": (3.5, 3.9), "auto2": (3.4, 3.6)}
    for job in expand(grid, "test", cells=list(bpc)):
        d = job.directory(raw)
        d.mkdir(parents=True)
        (d / "cell.json").write_text(json.dumps({"fingerprint": job.fingerprint}))
        summary = {
            "final_bits_per_char": bpc[job.cell][job.seed],
            "final_accuracy": 0.25 + 0.01 * job.seed,
            "uplink_bytes_per_client_round": 280_000 if job.cell == "fp32" else 20_000,
            "higher_is_better": False,
            "cpu_seconds": 10.0,
            "final_model_vnmse": {"2": {"tok_emb.weight": 0.1 * (1 + job.seed)}},
        }
        (d / "summary.json").write_text(json.dumps(summary))
        rows = [{"round": 1, "bits": {"tok_emb.weight": 3.0, "blocks.0.fc.weight": 2.0}}]
        rows += [{"round": 2, "bits": {"tok_emb.weight": 4.0, "blocks.0.fc.weight": 1.0}}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return grid_path, raw


def test_tables_from_hand_written_results(tmp_path: Path) -> None:
    grid_path, raw = _fake_results(tmp_path)
    c = collect(load_grid(grid_path), "test", raw)
    table = cell_table(c, "python-stdlib-text")
    lines = {line.split(":")[0]: line for line in table.splitlines() if line.startswith("| `")}
    assert "| 3.100 ± 0.141 | 25.5 ± 0.7 | 280,000 | 1.0x | — | 2 |" in lines["| `fp32`"]
    # bits2 - fp32 = (+0.5, +0.7): mean +0.6, sd 0.1414, t(1) = 12.706 -> half-width 1.27
    assert "| 14.0x | +0.600 [-0.671, +1.871] vs fp32 | 2 |" in lines["| `bits2`"]
    assert "+0.600" not in lines["| `auto2`"] and "vs bits2" in lines["| `auto2`"]
    assert "(+ = worse)" in table
    vn = vnmse_table(c, "python-stdlib-text")
    assert "| token embedding (tied head) | 1.50e-01 |" in vn  # mean of 0.1 and 0.2
    bits = allocated_bits(c, "python-stdlib-text")
    assert "| token embedding (tied head) | 3.50 | 3.00–4.00 |" in bits
    assert "| MLP (fc, out) | 1.50 | 1.00–2.00 |" in bits
    assert "no finished run" in allocated_bits(c, "python-stdlib-text", "maxabs4")


def test_docs_quote_the_committed_text_results() -> None:
    """docs/text-task.md holds the tables the committed raw results give; README quotes them."""
    root = GRID.parents[1]
    raw = root / "docs" / "results" / "text" / "claims-small" / "raw"
    c = collect(load_grid(GRID), "small", raw)
    ds = "python-stdlib-text"
    doc = (root / "docs" / "text-task.md").read_text()
    for table in (cell_table(c, ds), vnmse_table(c, ds), allocated_bits(c, ds)):
        assert table in doc
    readme = (root / "README.md").read_text().replace("−", "-")
    for cell in ("fp32", "bits2", "nearest2", "maxabs2", "auto2", "bits2-emb8", "bits4-ln4"):
        cr = c.get(ds, cell)
        assert cr is not None and len(cr.runs) == 3, cell
        mean = np.mean([r.summary["final_bits_per_char"] for r in cr.runs.values()])
        assert re.search(rf"[| /] {mean:.3f} [|/]", readme), cell
