"""The fedquant command: user errors, a short run, and crash-safe --resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedquant.cli import main
from fedquant.fl.simulation import TIMING_KEYS

FAST = ["--num-clients", "3", "--rounds", "2", "--quiet"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--rounds", "x"], "--rounds: 'x' is not valid; expected an integer >= 1"),
        (["run", "--rounds", "0"], "--rounds: 0 is out of range; expected an integer >= 1"),
        (
            ["run", "--partition", "random"],
            "--partition: 'random' is not valid; expected one of: iid, dirichlet, shards",
        ),
        (
            ["run", "--rounding", "up"],
            "--rounding: 'up' is not valid; expected one of: nearest, stochastic",
        ),
        (
            ["run", "--method", "best"],
            "--method: 'best' is not valid; expected one of: octav, octav-paper, max",
        ),
        (
            ["run", "--aggregation", "bulyan"],
            "--aggregation: 'bulyan' is not valid; expected one of: fedavg, inverse-mse, mean, "
            "median, trimmed-mean, krum, multi-krum",
        ),
        (
            ["run", "--norm-bound", "0.5"],
            "--norm-bound: 0.5 is not valid: expected 0 (no bound) or a number >= 1",
        ),
        (
            ["run", "--trim-fraction", "0.5"],
            "--trim-fraction: 0.5 is not valid: expected a number >= 0 and below 0.5",
        ),
        (
            ["run", "--byzantine-fraction", "-1"],
            "--byzantine-fraction: -1.0 is out of range; expected a number >= 0",
        ),
        (["run", "--hostile-mode", "scale-1e9"], "--hostile-mode: 'scale-1e9' is not valid"),
        (
            ["run", "--bits", "4-9"],
            "--bits: '4-9' is not valid: bits=9 is not a supported bit width; expected 1..8 or 32",
        ),
        (
            ["run", "--bits", "4-2-2"],
            "bits: '4-2-2' gives 3 per-layer widths but the model has 4 quantizable tensors",
        ),
        (
            ["run", "--client-fraction", "1.5"],
            "--client-fraction: 1.5 is out of range; expected a number >= 1e-09 and <= 1",
        ),
        (
            ["run", "--dataset", "fashion-mnist", "--data-root", "/nonexistent/fm"],
            "/nonexistent/fm",
        ),
        (
            ["run", "--config", "/nonexistent.toml"],
            "config: file '/nonexistent.toml' does not exist",
        ),
        (["run", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_user_errors_are_one_line_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) if "unrecognized" in message else _nullcontext():
        code = main([*argv, "--out", str(tmp_path)])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def test_config_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[clients]\nnum_clients = "ten"\n')
    assert main(["run", "--config", str(cfg)]) == 2
    assert "num_clients: 'ten' is not valid; expected an integer" in capsys.readouterr().err
    cfg.write_text("[train]\nlearning_rate = 0.1\n")
    assert main(["run", "--config", str(cfg)]) == 2
    assert "train.learning_rate: unknown option" in capsys.readouterr().err
    cfg.write_text("rounds = [\n")
    assert main(["run", "--config", str(cfg)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    from fedquant.fl.config import FIELDS

    for name in FIELDS:
        assert "--" + name.replace("_", "-") in out


@pytest.mark.slow
def test_short_run_writes_results(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[quant]\nbits = "2"\nrounding = "nearest"\n')
    assert (
        main(
            [
                "run",
                "--config",
                str(cfg),
                *FAST,
                "--out",
                str(tmp_path / "runs"),
                "--aggregation",
                "fedavg",
            ]
        )
        == 0
    )
    (run,) = (tmp_path / "runs").iterdir()
    for name in (
        "config.toml",
        "meta.json",
        "clients.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoint.npz",
        "accuracy_vs_round.png",
        "accuracy_vs_uplink.png",
    ):
        assert (run / name).is_file(), name
    text = (run / "config.toml").read_text()
    assert (
        'bits = "2"' in text and 'rounding = "nearest"' in text and 'aggregation = "fedavg"' in text
    )
    meta = json.loads((run / "meta.json").read_text())
    assert meta["seed"] == 0 and "torch" in meta["versions"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_accuracy"] == rows[-1]["test_accuracy"]
    # the resolved config reruns
    assert (
        main(
            [
                "run",
                "--config",
                str(run / "config.toml"),
                "--quiet",
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    args = ["--num-clients", "3", "--rounds", "6", "--quiet", "--seed", "3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fedquant = [sys.executable, "-m", "fedquant.cli", "run"]
    subprocess.run(
        [*fedquant, *args, "--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True
    )
    (ref,) = (tmp_path / "ref").iterdir()

    proc = subprocess.Popen(
        [*fedquant, *args, "--out", str(tmp_path / "killed")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # kill at a moment inside round 3 or 4 (after at least two checkpoints)
        deadline = time.time() + 300
        while time.time() < deadline:
            runs = list((tmp_path / "killed").glob("*/metrics.jsonl"))
            if runs and len(runs[0].read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.37)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    (killed,) = (tmp_path / "killed").iterdir()
    assert not (killed / "summary.json").exists()
    # what the kill left is whole: every metrics line parses, the checkpoint loads
    done = len(_metrics(killed))
    from fedquant.fl.results import ResultsDir

    ck = ResultsDir(killed).read_checkpoint()
    assert ck is not None and ck[0] >= done
    assert 2 <= done < 6
    out = subprocess.run(
        [*fedquant, "--resume", str(killed), "--quiet"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert _metrics(killed) == _metrics(ref)
    assert (
        json.loads((killed / "summary.json").read_text())["final_accuracy"]
        == json.loads((ref / "summary.json").read_text())["final_accuracy"]
    )


def test_resume_refuses_other_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--resume", str(tmp_path), "--rounds", "3"]) == 2
    assert "--resume: takes the configuration from DIR/config.toml" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "is not a fedquant results directory" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["compare", "bench", "fuzz", "reproduce", "robustness"])
def test_every_tool_takes_argv_and_prog(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib
    import inspect

    from fedquant.cli import TOOLS

    module, _ = TOOLS[name]
    assert list(inspect.signature(importlib.import_module(module).main).parameters)[:2] == [
        "argv",
        "prog",
    ]
    # the dispatcher passes the name the user typed; a bad flag is one line and exit 2
    with pytest.raises(SystemExit) as exit_:
        main([name, "x", "--no-such-flag"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedquant {name}: error: ")
    assert "--no-such-flag" in err[0]


def test_tool_names_are_the_dispatch_table() -> None:
    from fedquant.cli import TOOLS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert list(sub.choices) == ["run", *TOOLS]  # type: ignore[attr-defined]
