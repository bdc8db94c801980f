"""The next-character task: its loss and metrics, the workloads, and runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fedquant.cli import main
from fedquant.errors import ConfigError, DataError
from fedquant.fl.config import DATASET_DEFAULTS, RunConfig
from fedquant.fl.data.text import STDLIB_FILES, load_stdlib_corpus, load_text_folder
from fedquant.fl.simulation import WORKLOADS, Simulation
from fedquant.fl.text_task import (
    CONTEXT,
    evaluate_next_byte,
    federated_text,
    load_corpus,
    next_byte_loss,
    next_byte_task,
)


class _Fixed(nn.Module):
    """Logits that do not depend on the input: a fixed distribution over bytes."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*x.shape, -1)


def test_loss_is_mean_cross_entropy_over_positions() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 5))
    y = torch.randint(0, 256, (3, 5))
    logits = torch.randn(256)
    model = _Fixed(logits)
    expected = -torch.log_softmax(logits, 0)[y].mean()
    assert torch.allclose(next_byte_loss(model, (x, y)), expected, atol=1e-6)


def test_evaluate_bits_per_char_and_accuracy() -> None:
    """A model that always predicts byte 7 with p = 1/2: 1 bit per 7, its share correct."""
    logits = torch.full((256,), -1e4)
    logits[7] = 0.0
    logits[9] = 0.0  # p(7) = p(9) = 1/2; argmax picks 7 (first of the tie)
    model = _Fixed(logits)
    # 70 windows (more than one evaluation batch) of 4 targets; a quarter are 7, a quarter 9
    y = torch.tensor([7, 9, 7, 9] * 35 + [1, 2, 3, 4] * 35).view(70, 4)
    x = torch.zeros_like(y)
    m = evaluate_next_byte(model, TensorDataset(x, y), torch.device("cpu"))
    assert m["accuracy"] == pytest.approx(0.25)
    # half the targets cost ln 2 (1 bit), the other half ~1e4 nats; check the exact mean
    expected_nats = float(F.cross_entropy(logits.expand(280, -1), y.flatten()))
    assert m["loss"] == pytest.approx(expected_nats, rel=1e-6)
    assert m["bits_per_char"] == pytest.approx(m["loss"] / math.log(2), rel=1e-12)


def test_task_headline_is_bits_per_char_lower_better() -> None:
    t = next_byte_task()
    assert (t.metric, t.higher_is_better) == ("bits_per_char", False)


def test_federated_text_is_a_natural_partition_seeded() -> None:
    c = load_stdlib_corpus()
    a = federated_text(c, seed=0, train_windows=8, test_windows=20)
    b = federated_text(c, seed=0, train_windows=8, test_windows=20)
    other = federated_text(c, seed=1, train_windows=8, test_windows=20)
    assert a.num_clients == len(STDLIB_FILES) and a.sizes == [8] * len(STDLIB_FILES)
    assert a.input_shape == (CONTEXT,) and a.num_classes == 256
    assert a.labels is None  # no class labels: clients.json has empty label counts
    xa = a.clients[3].tensors[0]
    assert torch.equal(xa, b.clients[3].tensors[0])
    assert not torch.equal(xa, other.clients[3].tensors[0])
    # client 3's windows come from its own package's text
    train = c.train[3]
    for row in xa[:3]:
        assert bytes(row.numpy().astype(np.uint8)) in train
    assert a.meta["corpus"]["sha256"] == c.sha256
    # the test set does not depend on the seed
    assert torch.equal(a.test.tensors[0], other.test.tensors[0])


def test_load_corpus_unknown_name() -> None:
    with pytest.raises(ConfigError, match="'mnist' is not a text data set"):
        load_corpus("mnist", None)


def test_text_data_sets_are_registered_workloads() -> None:
    for name in ("python-stdlib-text", "text"):
        assert name in WORKLOADS and name in DATASET_DEFAULTS


def test_dataset_defaults_fill_only_missing_options() -> None:
    cfg = RunConfig.from_mapping({"dataset": "python-stdlib-text"})
    assert (cfg.model, cfg.bits, cfg.optimizer) == ("char-transformer", "4", "adam")
    cfg = RunConfig.from_mapping({"dataset": "python-stdlib-text", "bits": "2", "lr": 0.1})
    assert (cfg.bits, cfg.lr, cfg.batch_size) == ("2", 0.1, 16)
    assert RunConfig.from_mapping({}).bits == "4-2-2-4"  # image defaults unchanged


def _tiny_cfg(tmp_path: Path, **kw: object) -> RunConfig:
    values = {
        "dataset": "python-stdlib-text",
        "rounds": 1,
        "threads": 1,
        "out": str(tmp_path),
        **kw,
    }
    return RunConfig.from_mapping(values)


@pytest.mark.slow
def test_simulation_text_round_reports_bits_per_char(tmp_path: Path) -> None:
    sim = Simulation(_tiny_cfg(tmp_path, eval_every=1))
    assert sim.task.metric == "bits_per_char"
    state = sim.new_state()
    record = sim.run_round(state)
    # one round of Adam from a uniform-ish start: below log2(256) = 8 bits, above 0
    assert 0 < record.test["bits_per_char"] < 8
    assert record.test["bits_per_char"] == pytest.approx(record.test["loss"] / math.log(2))
    assert record.clients_aggregated == len(STDLIB_FILES)
    assert record.uplink_ratio > 6  # 4-bit uploads of a float32 model
    assert state.metrics[-1]["test_bits_per_char"] == record.test["bits_per_char"]


def test_folder_workload_needs_matching_num_clients(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(bytes(range(256)) * 4)
    assert load_text_folder(tmp_path).clients == ("a", "b")
    with pytest.raises(ConfigError, match="expected num_clients=2"):
        Simulation(_tiny_cfg(tmp_path, dataset="text", data_root=str(tmp_path), num_clients=3))
    with pytest.raises(DataError, match="no root given"):
        Simulation(_tiny_cfg(tmp_path, dataset="text"))


@pytest.mark.slow
def test_cli_run_on_the_stdlib_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The acceptance command (1 round here): results directory, corpus hash, bits per char."""
    out = tmp_path / "runs"
    rc = main(
        [
            "run",
            "--dataset",
            "python-stdlib-text",
            "--model",
            "char-transformer",
            "--rounds",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "final / best bits_per_char" in printed and "(natural" in printed
    (run,) = out.iterdir()
    names = {p.name for p in run.iterdir()}
    assert {"config.toml", "meta.json", "metrics.jsonl", "summary.json", "clients.json"} <= names
    assert "bits_per_char_vs_round.png" in names
    meta = json.loads((run / "meta.json").read_text())
    assert meta["dataset"]["corpus"]["sha256"] == load_stdlib_corpus().sha256
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["final_bits_per_char"] < 8


def test_cli_text_folder_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["run", "--dataset", "text", "--data-root", str(tmp_path / "none"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is not a folder" in err
