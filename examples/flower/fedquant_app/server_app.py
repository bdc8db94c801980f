"""ServerApp: QuantizedFedAvg over the SuperNodes, central evaluation on the test split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedquant.fl.client import evaluate
from fedquant.fl.models import PaperCNN, float32_state_bytes
from fedquant.flower import QuantizedFedAvg
from fedquant_app.task import downlink_spec, new_model, tensors, uplink_spec

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    seed = int(rc["seed"])
    model = new_model(seed)
    min_nodes = int(rc["min-nodes"])
    strategy = QuantizedFedAvg(
        uplink_spec(rc),
        aggregation=str(rc["aggregation"]),
        downlink=downlink_spec(rc),
        seed=seed,
        fraction_train=float(rc["fraction-train"]),
        fraction_evaluate=float(rc["fraction-evaluate"]),
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
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
            "aggregation": strategy.aggregation.value,
            "central": {str(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
            "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        }
        Path(path).write_text(json.dumps(report, indent=2))
