"""``fedquant run`` with client and server optimizers, schedules, FedProx and per-client widths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedquant.cli import main

# 2 of 10 clients (400 images each) per round, one evaluation at the end
TINY = ["--rounds", "2", "--client-fraction", "0.2", "--eval-every", "2", "--quiet"]


def _rows(out: Path) -> list[dict]:
    (run,) = out.iterdir()
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        ["--server-optimizer", "fedadam"],
        ["--server-optimizer", "fedyogi"],
        ["--server-optimizer", "fedavgm", "--server-momentum", "0.9"],
        ["--server-optimizer", "fedadagrad", "--server-lr", "0.01"],
        ["--optimizer", "adam", "--lr", "0.001"],
        ["--optimizer", "adamw", "--lr", "0.001"],
        ["--lr-schedule", "cosine"],
        ["--lr-schedule", "step", "--lr-step-rounds", "1", "--lr-gamma", "0.5"],
        ["--prox-mu", "0.01"],
        ["--client-bits", "2:0.5,4:0.3,8:0.2"],
    ],
)
def test_options_run(flags: list[str], tmp_path: Path) -> None:
    assert main(["run", *TINY, *flags, "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    assert 0.0 <= rows[-1]["test_accuracy"] <= 1.0
    (run,) = tmp_path.iterdir()
    toml = (run / "config.toml").read_text()
    key = flags[0][2:].replace("-", "_")
    assert f"{key} = " in toml and flags[1] in toml


def test_config_file_takes_the_new_keys(tmp_path: Path) -> None:
    from fedquant.fl.config import RunConfig
    from fedquant.fl.results import read_toml

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[client]\noptimizer = "adamw"\nlr_schedule = "cosine"\nprox_mu = 0.1\n'
        '[server]\nserver_optimizer = "fedyogi"\nserver_tau = 0.01\n'
        'client_bits = "2:0.25,8:0.75"\n'
    )
    rc = RunConfig.from_mapping(read_toml(cfg))
    assert (rc.optimizer, rc.lr_schedule, rc.prox_mu) == ("adamw", "cosine", 0.1)
    assert (rc.server_optimizer, rc.server_tau, rc.server_lr) == ("fedyogi", 0.01, None)
    assert rc.server_optimizer_obj().lr == 0.01  # Flower's FedYogi default
    assert rc.client_widths() == ((2, 0.25), (8, 0.75))
    assert rc.uses_spread  # auto: on with client_bits
    assert not rc.with_(mse_spread="off").uses_spread
    assert not RunConfig().uses_spread and RunConfig(mse_spread="on").uses_spread


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--server-optimizer", "fedsgd"],
            "--server-optimizer: 'fedsgd' is not valid; expected one of: none, fedavgm, fedadam,",
        ),
        (
            ["--optimizer", "rmsprop"],
            "--optimizer: 'rmsprop' is not valid; expected one of: sgd, adam, adamw",
        ),
        (
            ["--lr-schedule", "linear"],
            "--lr-schedule: 'linear' is not valid; expected one of: constant, cosine, step",
        ),
        (["--prox-mu", "-1"], "--prox-mu: -1.0 is out of range; expected a number >= 0"),
        (["--prox-mu", "lots"], "--prox-mu: 'lots' is not valid; expected a number >= 0"),
        (["--server-lr", "-0.1"], "--server-lr: -0.1 is out of range; expected a number >= 0"),
        (
            ["--server-momentum", "1.5"],
            "--server-momentum: 1.5 is out of range; expected a number >= 0 and <= 1",
        ),
        (["--server-tau", "x"], "--server-tau: 'x' is not valid; expected a number >= 0"),
        (
            ["--lr-step-rounds", "0"],
            "--lr-step-rounds: 0 is out of range; expected an integer >= 1",
        ),
        (["--lr-gamma", "2"], "--lr-gamma: 2.0 is out of range; expected a number >= 0 and <= 1"),
        (
            ["--client-bits", "2:0.5,4:0.6"],
            "--client-bits: '2:0.5,4:0.6' is not valid: the fractions in '2:0.5,4:0.6' sum to 1.1, "
            "expected 1",
        ),
        (
            ["--mse-spread", "maybe"],
            "--mse-spread: 'maybe' is not valid; expected one of: auto, on, off",
        ),
        (
            ["--client-bits", "16:1"],
            "--client-bits: '16:1' is not BITS:FRACTION with BITS in 1..8",
        ),
        (
            ["--client-bits", "2:1", "--bits", "auto:2"],
            "--client-bits: gives every client one width, but bits='auto:2'",
        ),
    ],
)
def test_bad_values_are_one_line_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
