"""``fedquant compare``: grouping by configuration, mean and spread over seeds, outputs, errors."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from fedquant.cli import main
from fedquant.errors import ConfigError, DataError
from fedquant.fl.compare import compare

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(
    root: Path,
    name: str,
    *,
    seed: int,
    bits: str,
    acc: list[float],
    loss: list[float] | None = None,
) -> Path:
    """A results directory as ``fedquant run`` writes it (only the files compare reads)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text(
        f'dataset = "mnist-embedded"\nbits = "{bits}"\nrounds = {len(acc)}\nseed = {seed}\n'
        f'out = "{root}"\n'
    )
    per_round = {"4-2-2-4": 25_000, "2": 12_000}[bits]
    rows = []
    for i, a in enumerate(acc, start=1):
        row = {
            "round": i,
            "uplink_bytes": per_round,
            "cum_uplink_bytes": per_round * i,
            "test_accuracy": a,
            "test_loss": (loss or [1.0] * len(acc))[i - 1],
        }
        rows.append(json.dumps(row))
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        write_run(tmp_path / "runs", "a-s0", seed=0, bits="4-2-2-4", acc=[0.5, 0.7, 0.8]),
        write_run(tmp_path / "runs", "a-s1", seed=1, bits="4-2-2-4", acc=[0.6, 0.7, 0.9]),
        write_run(tmp_path / "runs", "b-s0", seed=0, bits="2", acc=[0.4, 0.5, 0.55]),
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_seeds_of_one_configuration_give_mean_and_spread(runs: list[Path], tmp_path: Path) -> None:
    res = compare(runs, tmp_path / "out")
    assert [g.label for g in res.groups] == ["bits=4-2-2-4", "bits=2"]
    a, b = res.groups
    assert [r.path for r in a.runs] == runs[:2] and [r.path for r in b.runs] == runs[2:]
    np.testing.assert_allclose(a.curve.mean, [0.55, 0.7, 0.85])
    np.testing.assert_allclose(
        a.curve.std, np.std([[0.5, 0.7, 0.8], [0.6, 0.7, 0.9]], axis=0, ddof=1)
    )
    np.testing.assert_array_equal(a.curve.uplink_bytes, [25_000, 50_000, 75_000])
    np.testing.assert_array_equal(b.curve.std, [0, 0, 0])
    assert a.final.tolist() == [0.8, 0.9] and a.best.tolist() == [0.8, 0.9]
    table = res.table()
    assert table[0]["final accuracy"] == f"0.85 ± {np.std([0.8, 0.9], ddof=1):.2g}"
    assert table[1]["final accuracy"] == "0.55" and table[1]["runs"] == "1"


def test_outputs_plots_and_csv(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    compare(runs, out)
    for name in ("accuracy_vs_round.png", "accuracy_vs_uplink.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 9
    assert rows[0] == {
        "configuration": "bits=4-2-2-4",
        "run": str(runs[0]),
        "seed": "0",
        "round": "1",
        "cum_uplink_bytes": "25000",
        "accuracy": "0.5",
    }
    assert [float(r["accuracy"]) for r in rows if r["run"] == str(runs[2])] == [0.4, 0.5, 0.55]
    summary = read_csv(out / "summary.csv")
    assert [s["configuration"] for s in summary] == ["bits=4-2-2-4", "bits=2"]
    assert float(summary[0]["final_accuracy_mean"]) == pytest.approx(0.85)
    assert float(summary[0]["final_accuracy_sd"]) == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert float(summary[1]["total_uplink_bytes_mean"]) == 36_000


def test_a_folder_of_runs_and_a_lower_is_better_metric(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root, "x", seed=0, bits="2", acc=[0.1, 0.2], loss=[2.0, 1.5])
    write_run(root, "y", seed=1, bits="2", acc=[0.1, 0.2], loss=[1.8, 1.9])
    res = compare([root], tmp_path / "out", metric="loss")
    (g,) = res.groups
    assert g.label == "dataset=mnist-embedded, bits=2" and len(g.runs) == 2
    assert res.lower_is_better and g.best.tolist() == [1.5, 1.8] and g.final.tolist() == [1.5, 1.9]
    assert (tmp_path / "out" / "loss_vs_uplink.png").is_file()


def test_cli_prints_the_table(
    runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fedquant compare: accuracy (higher is better)" in text
    assert "bits=4-2-2-4" in text and f"0.85 ± {np.std([0.8, 0.9], ddof=1):.2g}" in text
    assert (out / "metrics.csv").is_file()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed"
)
def test_tensorboard_scalars(runs: list[Path], tmp_path: Path) -> None:
    compare(runs, tmp_path / "out")
    events = list((tmp_path / "out" / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 3


def test_errors_are_one_line(
    runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def err(*argv: str) -> str:
        assert main(["compare", *argv, "--out", str(tmp_path / "o")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    missing = tmp_path / "nope"
    assert f"RUN_DIR: {str(missing)!r} does not exist" in err(str(missing))
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    assert f"RUN_DIR: {str(afile)!r} is not a directory" in err(str(afile))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is not a fedquant results directory (no config.toml" in err(str(empty))
    assert "--metric: 'bpc' is not recorded in" in err(str(runs[0]), "--metric", "bpc")
    assert "expected one of: accuracy, loss" in err(str(runs[0]), "--metric", "bpc")
    with open(runs[1] / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    assert "metrics.jsonl', line 4: not valid JSON" in err(str(runs[1]))
    (runs[2] / "metrics.jsonl").unlink()
    assert "metrics.jsonl' is missing" in err(str(runs[2]))
    with pytest.raises(SystemExit) as exit_:
        main(["compare"])
    assert exit_.value.code == 2
    assert "the following arguments are required: RUN_DIR" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--out: .* is a file; expected a directory"):
        compare([runs[0]], afile)
    with pytest.raises(DataError, match=r"line 4: not valid JSON"):
        compare([runs[1]], tmp_path / "o")
