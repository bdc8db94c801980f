"""Batched client training (fedquant.fl.batched) against the one-by-one loop (train_local).

Tolerance. The batched pass computes the same functions in float32, but a
batched convolution or matrix product sums in another order than the
per-client one, so each step differs by float32 round-off (~1e-7 relative),
and SGD carries those differences into the next steps. Over the ~10-20 steps
here the largest difference seen was 2e-6 absolute on weights of size ~0.1-1,
so ``rtol=1e-4, atol=1e-6`` leaves room for other CPUs' summation orders while
staying ~100x below the effect of any real mistake: each ``*_matters`` check
below shows that getting momentum, weight decay, the batch order or the
partial last batch wrong moves the weights by more than 1e-3. (On the 8x8
inputs here the reductions are short; on 28x28 MNIST the loop's own float32
conv1 weight gradient is ~3e-4 relative off a float64 reference, so full-size
runs differ more -- see fedquant.fl.batched.)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedquant.errors import ConfigError, InvalidInputError
from fedquant.fl.batched import train_batched, unsupported_reason
from fedquant.fl.client import TrainConfig, train_local
from fedquant.fl.config import RunConfig
from fedquant.fl.data import Dataset
from fedquant.fl.models import PaperCNN
from fedquant.fl.simulation import TIMING_KEYS, Simulation
from fedquant.fl.task import image_classification_task

RTOL, ATOL = 1e-4, 1e-6  # see the module docstring
#: client sizes at batch 16: 70 = 4 x 16 + a partial batch of 6; 33 = 2 x 16 + a batch of
#: one (skipped, as train_local skips it); 48 = 3 full batches
SIZES = (70, 33, 48)
CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-2)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return PaperCNN((1, 8, 8), 4)


def tiny_data(sizes: Sequence[int] = SIZES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [
        (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
        for n in sizes
    ]


def gens(k: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + offset + c) for c in range(k)]


def loop_states(
    model: nn.Module, data: Sequence[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    states, losses = [], []
    for (x, y), g in zip(data, gens(len(data)), strict=True):
        m = copy.deepcopy(model)
        losses.append(train_local(m, TensorDataset(x, y), image_classification_task(), cfg, g).loss)
        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    return states, losses


def max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=k)
        else:  # num_batches_tracked counts steps: exact
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference() -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    return loop_states(tiny_model(), tiny_data(), CFG)


def test_batched_equals_loop_for_clients_of_different_sizes(reference) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    res = train_batched(model, tiny_data(), CFG, generators=gens(3))
    states, losses = reference
    for c in range(3):
        assert_states_close(res.states[c], states[c])
        assert res.stats[c].loss == pytest.approx(losses[c], rel=1e-5)
        assert res.stats[c].num_examples == SIZES[c]
    # the starting model is left as it was
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]), k
    # and training did move the weights
    assert max_gap(res.states[0], start) > 1e-2


def test_batchnorm_running_stats_are_per_client(reference) -> None:  # type: ignore[no-untyped-def]
    res = train_batched(tiny_model(), tiny_data(), CFG, generators=gens(3))
    states, _ = reference
    for c in range(3):
        for k in states[c]:
            if "running" in k:
                torch.testing.assert_close(res.states[c][k], states[c][k], rtol=RTOL, atol=ATOL)
    # steps per client: 2 epochs x (5, 2, 3) batches (the batch of one is skipped)
    got = [int(res.states[c]["bn1.num_batches_tracked"]) for c in range(3)]
    assert got == [10, 4, 6]
    # the clients' statistics differ from each other (not one shared buffer)
    assert (
        max_gap({"m": res.states[0]["bn3.running_mean"]}, {"m": res.states[1]["bn3.running_mean"]})
        > 1e-3
    )


@pytest.mark.parametrize(
    "change",
    [dict(momentum=0.0), dict(weight_decay=0.0), dict(momentum=0.0, weight_decay=0.0)],
    ids=["no-momentum", "no-weight-decay", "plain-sgd"],
)
def test_momentum_and_weight_decay_matter_and_match(change, reference) -> None:  # type: ignore[no-untyped-def]
    cfg = replace(CFG, **change)
    data = tiny_data()
    res = train_batched(tiny_model(), data, cfg, generators=gens(3))
    states, _ = loop_states(tiny_model(), data, cfg)
    for c in range(3):
        assert_states_close(res.states[c], states[c])
    # the setting changes the result far beyond the tolerance, so a batched SGD that
    # ignored momentum or weight decay would fail the test above
    assert max_gap(states[0], reference[0][0]) > 1e-3


def test_partial_last_batch_is_trained_on_like_the_loop(reference) -> None:  # type: ignore[no-untyped-def]
    one_epoch = replace(CFG, epochs=1)
    x, y = tiny_data()[0]
    # the 6 samples of client 0's partial last batch (its generator's first permutation)
    last6 = torch.randperm(70, generator=gens(1)[0])[64:]
    y2 = y.clone()
    y2[last6] = (y2[last6] + 1) % 4
    a = train_batched(tiny_model(), [(x, y)], one_epoch, generators=gens(1)).states[0]
    b = train_batched(tiny_model(), [(x, y2)], one_epoch, generators=gens(1)).states[0]
    # the labels of the last batch alone move the weights far beyond the tolerance ...
    assert max_gap(a, b) > 1e-3
    # ... and the batched results follow the loop's in both cases
    assert_states_close(a, loop_states(tiny_model(), [(x, y)], one_epoch)[0][0])
    assert_states_close(b, loop_states(tiny_model(), [(x, y2)], one_epoch)[0][0])


def test_each_client_uses_its_own_batch_order(reference) -> None:  # type: ignore[no-untyped-def]
    other = train_batched(tiny_model(), tiny_data(), CFG, generators=gens(3, offset=7))
    assert max_gap(other.states[0], reference[0][0]) > 1e-2


def test_uneven_groups_one_client_and_empty() -> None:
    data = tiny_data((40, 40, 17, 0))
    res = train_batched(tiny_model(), data, CFG, generators=gens(4))
    states, _ = loop_states(tiny_model(), data, CFG)
    for c in range(4):
        assert_states_close(res.states[c], states[c])
    one = train_batched(tiny_model(), data[2:3], CFG, generators=gens(3)[2:3])
    assert_states_close(one.states[0], states[2])
    assert res.stats[3].loss == 0.0 and int(res.states[3]["bn1.num_batches_tracked"]) == 0
    assert train_batched(tiny_model(), [], CFG, generators=[]).states == []


def test_same_generators_same_result_bit_for_bit() -> None:
    a = train_batched(tiny_model(), tiny_data(), CFG, generators=gens(3))
    b = train_batched(tiny_model(), tiny_data(), CFG, generators=gens(3))
    for sa, sb in zip(a.states, b.states, strict=True):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert [s.loss for s in a.stats] == [s.loss for s in b.stats]


def test_qat_is_not_batched() -> None:
    qat = TrainConfig(qat=True)
    x = tiny_data()[0][0]
    reason = unsupported_reason(tiny_model(), qat, x)
    assert reason is not None and reason.startswith("qat:")
    assert unsupported_reason(tiny_model(), CFG, x) is None
    with pytest.raises(
        InvalidInputError, match=r"train_batched: not supported: qat: .*use train_local"
    ):
        train_batched(tiny_model(), tiny_data(), qat, generators=gens(3))
    with pytest.raises(InvalidInputError, match="3 clients' data but 2 generators"):
        train_batched(tiny_model(), tiny_data(), CFG, generators=gens(2))


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.flatten(1)))


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.out = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.b(self.a(x.flatten(1))))


def test_unsupported_models_are_reported() -> None:
    x = tiny_data()[0][0]
    drop = unsupported_reason(DropoutNet(), CFG, x)
    assert drop is not None and "torch.func.vmap" in drop
    tied = unsupported_reason(TiedNet(), CFG, x)
    assert tied is not None and "ties" in tied


def tiny_dataset(n_train: int = 150) -> Dataset:
    rng = np.random.default_rng(5)
    return Dataset(
        name="tiny",
        train_x=rng.integers(0, 256, (n_train, 8, 8, 1), dtype=np.uint8),
        train_y=rng.integers(0, 4, n_train),
        test_x=rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
        test_y=rng.integers(0, 4, 40),
        classes=("a", "b", "c", "d"),
    )


SIM = dict(
    num_clients=3, rounds=2, batch_size=16, bits="32", partition="dirichlet", alpha=1.0, seed=3
)


def run_sim(**changes):  # type: ignore[no-untyped-def]
    sim = Simulation(RunConfig(**{**SIM, **changes}), dataset=tiny_dataset())
    return sim, sim.run()


def test_simulation_batched_matches_loop_and_is_deterministic() -> None:
    loop_sim, loop = run_sim(batched_clients=0)
    sizes = sorted(len(p) for p in loop_sim.parts)
    assert len(set(sizes)) == 3  # clients of different sizes
    b_sim, b1 = run_sim(batched_clients=2)  # chunks of 2 + 1 clients
    assert b_sim.clients_at_once == 2 and b_sim.batched_fallback is None
    _, b2 = run_sim(batched_clients=2)
    for k in loop.global_state:
        np.testing.assert_allclose(b1.global_state[k], loop.global_state[k], rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(b1.global_state[k], b2.global_state[k])

    def strip(rows):  # type: ignore[no-untyped-def]
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    assert strip(b1.metrics) == strip(b2.metrics)
    for rb, rl in zip(b1.metrics, loop.metrics, strict=True):
        assert rb["uplink_bytes"] == rl["uplink_bytes"]
        assert rb["train_loss"] == pytest.approx(rl["train_loss"], rel=1e-5)


def test_simulation_falls_back_for_qat(caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING, logger="fedquant.simulation"):
        sim = Simulation(
            RunConfig(**{**SIM, "rounds": 1, "bits": "8"}, qat=True, batched_clients=3),
            dataset=tiny_dataset(),
        )
    assert sim.clients_at_once == 0
    assert sim.batched_fallback is not None and sim.batched_fallback.startswith("qat:")
    assert "batched_clients=3: training clients one after another instead: qat:" in caplog.text
    state = sim.run()
    assert state.metrics[0]["clients_aggregated"] == 3


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_config_rejects_bad_batched_clients(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"^batched_clients: .* expected an integer >= 0"):
        RunConfig(batched_clients=bad)
    with pytest.raises(ConfigError, match=r"^batched_clients: "):
        RunConfig.from_mapping({"run": {"batched-clients": bad}})
    assert RunConfig(batched_clients=4).batched_clients == 4
