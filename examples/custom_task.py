"""Bring your own task: your model, data and training loop, with 4-bit uploads and FedAdam.

Twelve weather stations (the clients), each with its own climate, learn to forecast
tomorrow's temperature with a small MLP. Their readings never leave them; each round
they upload their weights quantized to 4 bits (OCTAV clipping) and the server steps
the global model with FedAdam. Run ``python examples/custom_task.py``: prints the final R^2.
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedquant.fl.config import RunConfig
from fedquant.fl.simulation import Simulation
from fedquant.fl.task import FederatedData, Task, TrainConfig, TrainStats

FEATURES = 6
TEACHER = torch.linspace(-1.0, 1.0, FEATURES)


def station(seed: int, n: int) -> TensorDataset:
    """One station's readings: its own climate shifts the inputs; the physics is shared."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g) + 0.5 * torch.randn(FEATURES, generator=g)
    y = torch.tanh(x @ TEACHER) + 0.3 * x[:, 0] * x[:, 1] + 0.05 * torch.randn(n, generator=g)
    return TensorDataset(x, y.unsqueeze(1))


def forecaster() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 1))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def train(model: nn.Module, data: Dataset, cfg: TrainConfig, gen: torch.Generator) -> TrainStats:
    """Our own local loop: Adam with gradient clipping, mini-batches from the seeded generator."""
    x, y = data.tensors  # type: ignore[attr-defined]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for b in range(0, len(x), cfg.batch_size):
            idx = order[b : b + cfg.batch_size]
            opt.zero_grad()
            loss = mse(model, (x[idx], y[idx]))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    return TrainStats(loss=float(loss.detach()), num_examples=len(x), seconds=0.0)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: torch.device) -> dict[str, float]:
    model.eval()
    x, y = (t.to(device) for t in data.tensors)  # type: ignore[attr-defined]
    err = float(F.mse_loss(model(x), y))
    return {"mse": err, "r2": 1.0 - err / float(y.var())}


def main() -> None:
    torch.manual_seed(0)
    stations = [station(seed, 300) for seed in range(12)]  # one data set per station
    data = FederatedData(clients=stations, test=station(99, 2000), name="stations")
    task = Task("forecast", loss=mse, evaluate=evaluate, metric="r2", train=train)
    # 4-bit weight matrices (biases travel as float32), FedAdam on the server
    opts = dict(bits="4", server_optimizer="fedadam", server_lr=0.01)
    cfg = RunConfig(num_clients=12, rounds=15, epochs=2, batch_size=32, lr=3e-3, **opts)
    sim = Simulation(cfg, data=data, model=forecaster(), task=task)
    with tempfile.TemporaryDirectory() as out:
        result = sim.run_to_dir(out)  # the same results directory as `fedquant run`
        s = result.summary
    print(
        f"final R^2 {s['final_r2']:.3f} (best {s['best_r2']:.3f}) after {s['rounds']} rounds; "
        f"uplink {s['total_uplink_bytes'] / 1e3:.0f} kB, "
        f"{s['uplink_ratio_vs_float32']:.1f}x smaller than float32"
    )


if __name__ == "__main__":
    main()
