"""ServerApp: a Flower strategy wrapped in QuantizedStrategy, central evaluation on the test split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from fedquant.fl.client import evaluate
from fedquant.fl.models import PaperCNN, float32_state_bytes
from fedquant.flower import QuantizedStrategy
from fedquant_app.task import downlink_spec, new_model, tensors, uplink_spec

app = ServerApp()


def flower_strategy(rc: Any) -> Strategy:
    """The Flower strategy named by the run config's ``strategy``, with its sampling settings."""
    min_nodes = int(rc["min-nodes"])
    sampling = {
        "fraction_train": float(rc["fraction-train"]),
        "fraction_evaluate": float(rc["fraction-evaluate"]),
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes,
        "min_available_nodes": min_nodes,
    }
    eta = float(rc["server-lr"])
    name = str(rc["strategy"])
    strategies = {
        "fedavg": lambda: FedAvg(**sampling),
        "fedadam": lambda: FedAdam(**sampling, eta=eta, eta_l=float(rc["lr"])),
        "fedyogi": lambda: FedYogi(**sampling, eta=eta, eta_l=float(rc["lr"])),
        "fedavgm": lambda: FedAvgM(**sampling, server_learning_rate=eta, server_momentum=0.9),
        "fedmedian": lambda: FedMedian(**sampling),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**sampling, beta=0.2),
    }
    if name not in strategies:
        raise ValueError(f"strategy={name!r}; expected one of {sorted(strategies)}")
    return strategies[name]()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    seed = int(rc["seed"])
    model = new_model(seed)
    strategy = QuantizedStrategy(
        flower_strategy(rc),
        uplink_spec(rc),
        aggregation=str(rc["aggregation"]),
        downlink=downlink_spec(rc),
        seed=seed,
    )
    data = tensors()

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        m = PaperCNN()
        m.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(m, data.test_x, data.test_y)
        return MetricRecord({"accuracy": acc, "loss": loss})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(rc["num-server-rounds"]),
        evaluate_fn=central_evaluate,
    )

    path = str(rc.get("results-path", ""))
    if path:
        report: dict[str, Any] = {
            "float32-bytes": float32_state_bytes(model),
            "uplink": uplink_spec(rc).to_dict(),
            "aggregation": strategy.aggregation,
            "strategy": str(rc["strategy"]),
            "central": {str(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
            "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        }
        Path(path).write_text(json.dumps(report, indent=2))
