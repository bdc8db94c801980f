"""What the ClientApp and the ServerApp share: the model, the data and the run settings."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from fedquant.fl.client import TrainConfig
from fedquant.fl.data import TensorData, load_dataset, to_tensors
from fedquant.fl.models import PaperCNN
from fedquant.fl.partition import partition
from fedquant.fl.seeding import Purpose, int_seed
from fedquant.quant.spec import QuantSpec

DATASET = "mnist-embedded"


def new_model(seed: int) -> PaperCNN:
    """The paper's CNN, initialized from the stream ``(seed, INIT)`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int_seed(seed, Purpose.INIT))
        return PaperCNN(in_shape=(1, 28, 28), num_classes=10)


@functools.lru_cache(maxsize=1)
def tensors() -> TensorData:
    """The embedded MNIST subset (4,000 train / 1,000 test) as normalized tensors."""
    return to_tensors(load_dataset(DATASET))


def client_data(
    partition_id: int, num_partitions: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This node's IID share of the train and test splits: ``(x, y, x_test, y_test)``.

    Every node computes the same partitions from the run seed and keeps its own.
    """
    data = tensors()
    part_seed = int_seed(seed, Purpose.PARTITION)
    train = partition(data.train_y.numpy(), num_partitions, "iid", seed=part_seed)[partition_id]
    test = partition(data.test_y.numpy(), num_partitions, "iid", seed=part_seed)[partition_id]
    tr, te = torch.from_numpy(train), torch.from_numpy(test)
    return data.train_x[tr], data.train_y[tr], data.test_x[te], data.test_y[te]


def train_config(run_config: Mapping[str, Any]) -> TrainConfig:
    return TrainConfig(
        epochs=int(run_config["local-epochs"]),
        batch_size=int(run_config["batch-size"]),
        lr=float(run_config["lr"]),
        momentum=float(run_config["momentum"]),
        weight_decay=float(run_config["weight-decay"]),
        qat=bool(run_config["qat"]),
    )


def uplink_spec(run_config: Mapping[str, Any]) -> QuantSpec:
    return QuantSpec.from_dict(
        {k: run_config[k] for k in ("bits", "rules", "method", "rounding", "granularity")}
    )


def downlink_spec(run_config: Mapping[str, Any]) -> QuantSpec | None:
    bits = str(run_config.get("downlink-bits", "")).strip()
    if not bits:
        return None
    return QuantSpec.from_dict(
        {"bits": bits, **{k: run_config[k] for k in ("method", "rounding", "granularity")}}
    )
