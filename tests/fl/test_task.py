"""The task protocol: custom data, models, losses and training loops through the simulator;
client optimizers, learning-rate schedules, FedProx, heterogeneous widths, server optimizers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedquant.cli import main
from fedquant.errors import ConfigError, DataError, InvalidInputError
from fedquant.fl.client import make_optimizer, proximal_term, train_local
from fedquant.fl.config import RunConfig
from fedquant.fl.data import Dataset as ImageDataset
from fedquant.fl.data import load_dataset
from fedquant.fl.results import ResultsDir
from fedquant.fl.round import RoundRecord
from fedquant.fl.simulation import (
    TIMING_KEYS,
    RunState,
    Simulation,
    restore_state,
    resume_state,
    round_lr,
    run_to_dir,
    train_config,
)
from fedquant.fl.task import (
    FederatedData,
    Task,
    TrainConfig,
    TrainStats,
    dataset_labels,
    federate,
    image_classification_task,
)
from fedquant.quant.codec import describe_payload


@pytest.fixture(scope="module")
def small() -> ImageDataset:
    """600 training and 200 test images of the embedded MNIST subset."""
    d = load_dataset("mnist-embedded")
    return ImageDataset(
        d.name, d.train_x[:600], d.train_y[:600], d.test_x[:200], d.test_y[:200], d.classes
    )


def strip(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in metrics]


# ----------------------------------------------------------------- non-image data


class TokenModel(nn.Module):
    """Predicts the next token from the current one; refuses float input."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.out = nn.Linear(8, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.int64, x.dtype
        return self.out(self.emb(x))


def token_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 16, (n,), generator=g)
    return TensorDataset(x, (x + 1) % 16)  # the next token is x + 1: learnable


def test_integer_tensors_pass_unnormalized_and_learn() -> None:
    cfg = RunConfig(num_clients=3, rounds=4, bits="8", lr=0.5, momentum=0.0, seed=2)
    sim = Simulation(cfg, data=(token_data(600, 0), token_data(200, 1)), model=TokenModel())
    assert sim.data.labels is not None  # the last integer tensor is read as labels
    state = sim.run()
    assert state.metrics[-1]["test_accuracy"] > 0.9


class Pairs(Dataset):
    """A map-style data set of dict samples (not tensors): needs the collate path."""

    def __init__(self, n: int, seed: int) -> None:
        self.data = token_data(n, seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"tok": x, "next": y}


def dict_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["tok"]), batch["next"])


def dict_eval(model: nn.Module, data: Dataset, device: torch.device) -> dict[str, float]:
    xs = torch.stack([data[i]["tok"] for i in range(len(data))])  # type: ignore[arg-type]
    ys = torch.stack([data[i]["next"] for i in range(len(data))])  # type: ignore[arg-type]
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(xs.to(device)), ys.to(device)))
    return {"loss": loss}


def test_natural_partition_custom_loss_and_metric(tmp_path: Path) -> None:
    clients = [Pairs(50 * (i + 1), i) for i in range(3)]  # sizes 50, 100, 150
    data = FederatedData(clients=clients, test=Pairs(100, 9), name="pairs")
    assert data.labels is None and data.sizes == [50, 100, 150]
    task = Task(
        "next-token", loss=dict_loss, evaluate=dict_eval, metric="loss", higher_is_better=False
    )
    cfg = RunConfig(num_clients=3, rounds=3, bits="8", aggregation="fedavg", lr=0.5, momentum=0.0)
    sim = Simulation(cfg, data=data, model=TokenModel(), task=task)
    res = run_to_dir(sim, tmp_path)
    rows = res.state.metrics
    assert "test_loss" in rows[-1] and "test_accuracy" not in rows[-1]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert res.summary["final_loss"] == rows[-1]["test_loss"]
    assert res.summary["best_loss"] == min(r["test_loss"] for r in rows)
    assert "-pairs-b8-fedavg-s0" in res.path.name
    for name in ("config.toml", "meta.json", "clients.json", "summary.json", "loss_vs_round.png"):
        assert (res.path / name).is_file(), name
    assert '"sizes": [\n    50,\n    100,\n    150\n  ]' in (res.path / "clients.json").read_text()


def test_data_errors() -> None:
    cfg = RunConfig(num_clients=2, rounds=1)
    with pytest.raises(ConfigError, match="num_clients: is 2 but the data has 3 clients"):
        Simulation(cfg, data=FederatedData([token_data(9, i) for i in range(3)], token_data(9, 5)))
    with pytest.raises(ConfigError, match="cannot build 'paper-cnn'.*pass model="):
        Simulation(cfg, data=FederatedData([Pairs(9, 0), Pairs(9, 1)], Pairs(9, 2)))
    with pytest.raises(ConfigError, match="partition: 'dirichlet' splits by class label"):
        federate(torch.randn(10, 3), torch.randn(4, 3), num_clients=2, scheme="dirichlet", seed=0)
    with pytest.raises(DataError, match="different first dimensions"):
        federate((torch.zeros(4), torch.zeros(5)), torch.zeros(2), num_clients=2, seed=0)
    with pytest.raises(DataError, match="client 1 has no samples"):
        FederatedData([token_data(3, 0), token_data(0, 1)], token_data(3, 2))
    with pytest.raises(DataError, match="expected a torch.utils.data.Dataset"):
        FederatedData(["text"], token_data(3, 2))  # type: ignore[list-item]


def test_federate_partitions_by_labels_or_iid() -> None:
    x, y = torch.randn(100, 2), torch.arange(100) % 5
    fd = federate(
        (x, y), (x[:10], y[:10]), num_clients=5, scheme="shards", shards_per_client=1, seed=0
    )
    assert fd.num_classes == 5
    assert [len(np.unique(lab)) for lab in fd.labels or []] == [1] * 5  # one shard: one class
    iid = federate(torch.randn(10, 2), torch.randn(4, 2), num_clients=3, seed=0)
    assert sorted(iid.sizes) == [3, 3, 4] and iid.labels is None
    assert dataset_labels(TensorDataset(torch.randn(4, 2), torch.randn(4))) is None


# ----------------------------------------------------------------- the client loop


def test_custom_train_function_gets_round_lr_and_seeded_generator(small: ImageDataset) -> None:
    calls: list[tuple[float, int]] = []

    def train(
        model: nn.Module, data: Dataset, cfg: TrainConfig, gen: torch.Generator
    ) -> TrainStats:
        calls.append((cfg.lr, int(torch.randint(0, 10**9, (1,), generator=gen))))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        return TrainStats(loss=1.0, num_examples=len(data), seconds=0.0)  # type: ignore[arg-type]

    task = Task(
        "halve",
        loss=lambda m, b: torch.zeros(()),
        evaluate=lambda m, d, dev: {"x": 1.0},
        metric="x",
        train=train,
    )
    cfg = RunConfig(
        num_clients=2,
        rounds=2,
        bits="8",
        lr=0.1,
        lr_schedule="step",
        lr_step_rounds=1,
        lr_gamma=0.5,
    )
    first = Simulation(cfg, dataset=small, task=task).run()
    assert [c[0] for c in calls] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    draws = [c[1] for c in calls]
    assert len(set(draws)) == 4  # a stream per (round, client)
    calls.clear()
    Simulation(cfg, dataset=small, task=task).run()
    assert [c[1] for c in calls] == draws  # ... derived from the seed
    assert first.metrics[-1]["test_x"] == 1.0
    bad = Task("bad", loss=task.loss, evaluate=task.evaluate, train=lambda *a: 3)  # type: ignore[arg-type,return-value]
    with pytest.raises(InvalidInputError, match="train\\(\\) returned int, expected TrainStats"):
        train_local(TokenModel(), token_data(4, 0), bad, TrainConfig(), torch.Generator())


def test_optimizers_and_schedules() -> None:
    params = list(TokenModel().parameters())
    assert isinstance(
        make_optimizer(params, TrainConfig(optimizer="adam", lr=0.3)), torch.optim.Adam
    )
    opt = make_optimizer(params, TrainConfig(optimizer="adamw", lr=0.3, weight_decay=0.2))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.2
    with pytest.raises(InvalidInputError, match="optimizer 'rmsprop' is unknown"):
        make_optimizer(params, TrainConfig(optimizer="rmsprop"))
    cos = RunConfig(lr=0.1, rounds=4, lr_schedule="cosine")
    assert [round_lr(cos, t) for t in (1, 2, 3, 4)] == pytest.approx(
        [
            0.1,
            0.1 * (1 + math.cos(math.pi / 4)) / 2,
            0.05,
            0.1 * (1 + math.cos(3 * math.pi / 4)) / 2,
        ]
    )
    step = RunConfig(lr=0.1, rounds=5, lr_schedule="step", lr_step_rounds=2, lr_gamma=0.5)
    assert [round_lr(step, t) for t in range(1, 6)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert train_config(RunConfig(lr=0.1), 7).lr == 0.1


def test_fedprox_term_and_pull() -> None:
    model = TokenModel()
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        model.out.bias.add_(2.0)  # 16 entries moved by 2: ||w - a||^2 = 64
    assert float(proximal_term(model, anchor, 0.5).detach()) == pytest.approx(0.25 * 64)

    def drift(mu: float) -> float:
        torch.manual_seed(0)
        m = TokenModel()
        start = {k: v.detach().clone() for k, v in m.named_parameters()}
        cfg = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, prox_mu=mu, epochs=3)
        train_local(m, token_data(256, 0), image_classification_task(), cfg, torch.Generator())
        return sum(float(((p - start[k]) ** 2).sum()) for k, p in m.named_parameters())

    assert drift(5.0) < 0.5 * drift(0.0)


# ----------------------------------------------------------------- heterogeneous widths


@pytest.mark.slow
def test_client_bits_assignment_and_payloads(small: ImageDataset) -> None:
    cfg = RunConfig(num_clients=10, rounds=1, client_bits="2:0.5,4:0.3,8:0.2", seed=3)
    sim = Simulation(cfg, dataset=small)
    widths = {c: sim.client_spec(c).default_bits for c in range(10)}
    assert sorted(widths.values()) == [2] * 5 + [4] * 3 + [8] * 2
    again = Simulation(cfg, dataset=small)
    assert {c: again.client_spec(c).default_bits for c in range(10)} == widths
    other = Simulation(cfg.with_(seed=4), dataset=small)
    assert {c: other.client_spec(c).default_bits for c in range(10)} != widths
    start = sim.new_state().global_state
    for c in (0, 1, 2):
        payload = sim.client_payload(c, start, 1).payload
        bits = {i.bits for i in describe_payload(payload).info.values() if i.quantized}
        assert bits == {widths[c]}
    state = sim.new_state()
    record = sim.run_round(state)
    assert record.clients_aggregated == 10
    assert state.metrics == [record.to_row()] and state.metrics[0]["clients_aggregated"] == 10


def test_client_bits_config_errors() -> None:
    for value, msg in (
        ("2:0.5,4:0.6", "sum to 1.1, expected 1"),
        ("9:1", "'9:1' is not BITS:FRACTION"),
        ("2", "'2' is not BITS:FRACTION"),
        ("2:0.5,2:0.5", "width 2 is given twice"),
        ("4:-1,2:2", "'4:-1' is not BITS:FRACTION"),
    ):
        with pytest.raises(ConfigError, match=f"client_bits: .*{msg}"):
            RunConfig(client_bits=value)
    with pytest.raises(ConfigError, match="client_bits: gives every client one width"):
        RunConfig(client_bits="2:1", bits="auto:2")


# ----------------------------------------------------------------- server optimizer


@pytest.mark.slow
def test_server_optimizer_state_resumes_exactly(small: ImageDataset, tmp_path: Path) -> None:
    cfg = RunConfig(
        num_clients=3,
        rounds=4,
        bits="4",
        server_optimizer="fedadam",
        server_lr=0.01,
        upload="delta",
        error_feedback=True,
        optimizer="adam",
        lr=1e-3,
        prox_mu=0.01,
        lr_schedule="cosine",
    )
    whole = run_to_dir(Simulation(cfg, dataset=small), tmp_path / "a")
    assert set(whole.state.server_opt) >= {"step", "m/conv1.weight", "v/conv1.weight"}
    # a run stopped after round 2 and resumed from its directory ends identically
    sim = Simulation(cfg, dataset=small)
    part: list[RunState] = []

    class Stop(Exception):
        pass

    def stop(st: RunState, record: RoundRecord) -> None:
        if st.round == 2:
            raise Stop

    with pytest.raises(Stop):
        run_to_dir(sim, tmp_path / "b", on_round=stop)
    (path,) = (tmp_path / "b").iterdir()
    rd = ResultsDir(path)
    resumed = Simulation(rd.read_config(), dataset=small)
    state = resume_state(resumed, rd)
    part.append(state)
    assert state.round == 2 and int(state.server_opt["step"]) == 2
    end = run_to_dir(resumed, results=rd, state=state)
    assert strip(end.state.metrics) == strip(whole.state.metrics)
    for k, v in whole.state.global_state.items():
        assert np.array_equal(v, end.state.global_state[k]), k
    # and the optimizer changed the trajectory
    plain = Simulation(cfg.with_(server_optimizer="none"), dataset=small).run()
    assert strip(plain.metrics) != strip(whole.state.metrics)
    # a checkpoint the caller already read restores the same state
    again = restore_state(Simulation(rd.read_config(), dataset=small), rd, rd.read_checkpoint())
    assert again.round == 4 and strip(again.metrics) == strip(end.state.metrics)


def test_cli_resume_reads_the_checkpoint_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = RunConfig(num_clients=2, rounds=1, bits="4", out=str(tmp_path))
    done = run_to_dir(Simulation(cfg), tmp_path)
    reads: list[Path] = []
    original = ResultsDir.read_checkpoint

    def counted(self: ResultsDir) -> Any:
        reads.append(self.path)
        return original(self)

    monkeypatch.setattr(ResultsDir, "read_checkpoint", counted)
    assert main(["run", "--resume", str(done.path), "--quiet"]) == 0
    assert "this run is complete (1 rounds)" in capsys.readouterr().out
    assert reads == [done.path]


def test_server_optimizer_only_steps_parameters(small: ImageDataset) -> None:
    sim = Simulation(
        RunConfig(num_clients=2, rounds=1, server_optimizer="fedavgm", server_momentum=0.9),
        dataset=small,
    )
    names = set(sim.server_opt_names)
    assert "conv1.weight" in names
    assert not any("running" in n or "num_batches" in n for n in names)
    assert names == {n for n, _ in sim.model.named_parameters()}


def tokens_workload(cfg: RunConfig) -> tuple[FederatedData, Task]:
    """A workload loader as a ``--dataset`` plug-in registers it."""
    data = FederatedData([token_data(40, i) for i in range(cfg.num_clients)], token_data(40, 99))
    return data, image_classification_task()


def test_registered_workload_is_loaded_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedquant.fl import simulation

    monkeypatch.setitem(simulation.WORKLOADS, "mnist", f"{__name__}:tokens_workload")
    sim = Simulation(
        RunConfig(dataset="mnist", num_clients=2, rounds=1, bits="8"), model=TokenModel()
    )
    assert sim.data.sizes == [40, 40] and sim.dataset is None
    assert sim.describe_data()["task"] == "classification"
    monkeypatch.setitem(simulation.WORKLOADS, "mnist", f"{__name__}:no_such_loader")
    with pytest.raises(ConfigError, match="dataset: cannot load the workload"):
        Simulation(RunConfig(dataset="mnist", num_clients=2), model=TokenModel())
