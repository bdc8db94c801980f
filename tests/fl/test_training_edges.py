"""Local training at its edges: a client with one example, a learning rate that diverges."""

from __future__ import annotations

import re

import pytest
import torch

from fedquant.errors import NonFiniteError
from fedquant.fl.client import TrainConfig, train_local
from fedquant.fl.models import PaperCNN


def _model() -> PaperCNN:
    torch.manual_seed(0)
    return PaperCNN((1, 8, 8), 2)


def test_a_client_with_one_example_leaves_the_model_as_it_got_it() -> None:
    # BatchNorm raises "Expected more than 1 value per channel" on a batch of one
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([1])
    stats = train_local(model, x, y, TrainConfig(), generator=torch.Generator().manual_seed(0))
    assert stats.num_examples == 1
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_a_last_batch_of_one_is_skipped_and_the_rest_trains() -> None:
    model = _model()
    before = model.conv1.weight.detach().clone()
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 0, 1, 0])
    train_local(model, x, y, TrainConfig(batch_size=2), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model.conv1.weight, before)
    assert int(model.bn1.num_batches_tracked) == 2  # batches of 2, 2; the one of 1 skipped


@pytest.mark.parametrize("lr", [1e6, 1e30])
def test_divergence_names_the_learning_rate(lr: float) -> None:
    model = _model()
    x = torch.randn(64, 1, 8, 8) * 10
    y = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(
        NonFiniteError, match=rf"local training diverged .*lr={re.escape(f'{lr:g}')} .*smaller --lr"
    ):
        train_local(
            model,
            x,
            y,
            TrainConfig(lr=lr, epochs=5, batch_size=8),
            generator=torch.Generator().manual_seed(0),
        )
