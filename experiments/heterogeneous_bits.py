"""Heterogeneous uplink widths: accuracy vs uniform widths at equal total bytes.

Runs the simulator on the first ``--train`` / ``--test`` images of the embedded
MNIST subset (10 clients, the paper's CNN, batch 16, one torch thread) for each
configuration below, IID and Dirichlet(0.3) label skew, and writes a JSON file
and a Markdown table (final test accuracy, total uplink bytes); the JSON also
holds each round's largest aggregation weight.

    nice -n 10 python experiments/heterogeneous_bits.py --rounds 6 \
        --out docs/results/heterogeneous-bits.json

Half the clients at 2 bits and half at 8 average 5 bits per weight, the bytes
of every client at 5 bits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedquant.fl.config import RunConfig
from fedquant.fl.data import Dataset, load_dataset
from fedquant.fl.simulation import Simulation, final_accuracy

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("uniform 5 bits", {"bits": "5"}),
    ("2:0.5,8:0.5 inverse-mse", {"client_bits": "2:0.5,8:0.5", "mse_spread": "off"}),
    ("2:0.5,8:0.5 mean", {"client_bits": "2:0.5,8:0.5", "aggregation": "mean"}),
    ("2:0.5,8:0.5 inverse-mse + spread (default)", {"client_bits": "2:0.5,8:0.5"}),
]
SCENARIOS: list[tuple[str, dict[str, Any]]] = [
    ("dirichlet 0.3", {"partition": "dirichlet", "alpha": 0.3}),
    ("iid", {"partition": "iid"}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--train", type=int, default=1000, help="training images used")
    p.add_argument("--batch-size", type=int, default=16, help="local mini-batch size")
    p.add_argument("--test", type=int, default=500, help="test images used")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", default="", help="run only the configurations naming this")
    args = p.parse_args()
    full = load_dataset("mnist-embedded")
    data = Dataset(
        full.name,
        full.train_x[: args.train],
        full.train_y[: args.train],
        full.test_x[: args.test],
        full.test_y[: args.test],
        full.classes,
    )
    rows = []
    for scen, scen_kw in SCENARIOS:
        for name, kw in CONFIGS:
            if args.only not in name:
                continue
            cfg = RunConfig(
                rounds=args.rounds,
                seed=args.seed,
                batch_size=args.batch_size,
                eval_every=args.rounds,  # evaluate once, after the last round
                threads=1,
                **scen_kw,
                **kw,
            )
            t0 = time.perf_counter()
            state = Simulation(cfg, dataset=data).run()
            m = state.metrics
            rows.append(
                {
                    "scenario": scen,
                    "config": name,
                    "final_accuracy": final_accuracy(m),
                    "total_uplink_bytes": m[-1]["cum_uplink_bytes"],
                    # the largest weight any client had for any tensor, per round
                    "max_weight_used": [r.get("max_weight_used") for r in m],
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({**vars(args), "out": str(args.out), "rows": rows}, indent=2) + "\n"
    )
    print("\n| data | configuration | final accuracy | total uplink |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scenario']} | {r['config']} | {100 * r['final_accuracy']:.2f} % "
            f"| {r['total_uplink_bytes'] / 1e6:.2f} MB |"
        )


if __name__ == "__main__":
    main()
