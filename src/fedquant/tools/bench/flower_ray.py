"""The simulator vs Flower's simulation engine (Ray), on the same clients, model, data, rounds.

:func:`simulator_vs_flower` runs one configuration twice in the same
process, one after the other:

1. with fedquant's simulator (:class:`fedquant.fl.simulation.Simulation`):
   one process, one working model, clients trained one after another;
2. with Flower's simulation engine (``flwr.simulation.run_simulation``, the
   Ray backend): a ServerApp with :class:`fedquant.flower.QuantizedFedAvg`
   in a thread of this process, and ``num_clients`` virtual SuperNodes whose
   ClientApp (:data:`client_app`, with :func:`fedquant.flower.fedquant_mod`)
   runs in Ray actors, ``client_cpus`` CPUs each.

Both sides use the same initial model, the same IID partition, the same
local training (:func:`fedquant.fl.client.train_local` with the
simulator's seeded mini-batch order), the same uplink codec and seeds (the
mod seeds client ``k`` with its ``partition-id``, the simulator with ``k``),
the same aggregation (inverse-MSE with the simulator's weight cap and MSE
floor) and the same central evaluation on the test split after every round,
so their accuracies agree (exactly when training runs on the same number of
threads; the row reports the largest difference).

Timing: Flower's *startup* is the wall time from calling ``run_simulation``
to the first client starting to train (Ray's start, the actors' start and
imports, the ServerApp's round-0 evaluation, all overlapping); a *round* is
the time between the ends of consecutive central evaluations. The
simulator's startup is building :class:`~fedquant.fl.simulation.Simulation`.
Flower needs ``flwr[simulation]`` (Ray); without it the comparison is
skipped. ``flwr.simulation.run_simulation`` is deprecated in Flower 1.42 in
favour of ``flwr run``, which drives the same engine from the command line.

It sits beside the benchmarks and imports :mod:`fedquant.flower` (never the
other way round); ``fedquant bench --only federated`` imports it only when
:func:`fedquant.tools.bench.federated.flower_missing` finds Flower and Ray.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fedquant.errors import ConfigError, FedquantError
from fedquant.fl.config import RunConfig
from fedquant.tools.bench.federated import Log, flower_missing, load_average, small_dataset
from fedquant.tools.report import Row

#: the train ConfigRecord key that carries the run (JSON of RunConfig and the data subset)
RUN_KEY = "bench.run"


# --------------------------------------------------------------------------- the client side


@functools.lru_cache(maxsize=2)
def _client_setup(run_json: str) -> tuple[Any, Any, list[np.ndarray], Any, Any]:
    """What a ClientApp process needs for a run, built once per actor.

    Returns ``(cfg, tensors, parts, model, train_cfg)`` with the simulator's
    partition and model.
    """
    from fedquant.fl.data import load_dataset, to_tensors
    from fedquant.fl.simulation import client_parts, make_model, train_config

    spec = json.loads(run_json)
    cfg = RunConfig.from_mapping(spec["config"])
    data = small_dataset(
        load_dataset(cfg.dataset, cfg.data_root, cfg.cache_dir), spec["n_train"], spec["n_test"]
    )
    parts = client_parts(cfg, data.train_y)
    model = make_model(cfg, data.input_shape, data.num_classes)
    train_cfg = train_config(cfg)
    return cfg, to_tensors(data), parts, model, train_cfg


def _train(msg: Any, context: Any) -> Any:
    """The ClientApp's train function: the simulator's client, as a Flower app."""
    import torch
    from flwr.app import Message, MetricRecord, RecordDict
    from torch.utils.data import TensorDataset

    from fedquant.fl import seeding
    from fedquant.fl.client import load_numpy_state, state_numpy, train_local
    from fedquant.fl.simulation import train_config
    from fedquant.fl.task import image_classification_task
    from fedquant.flower.records import numpy_from_record, record_from_numpy

    t0 = time.time()
    config = msg.content["config"]
    cfg, data, parts, model, train_cfg = _client_setup(str(config[RUN_KEY]))
    pid = int(context.node_config["partition-id"])
    server_round = int(config["server-round"])
    load_numpy_state(model, numpy_from_record(msg.content["arrays"]))
    idx = torch.from_numpy(parts[pid])
    stats = train_local(
        model,
        TensorDataset(data.train_x[idx], data.train_y[idx]),
        image_classification_task(),
        train_config(cfg, server_round) if cfg.lr_schedule != "constant" else train_cfg,
        seeding.torch_generator(cfg.seed, seeding.Purpose.SHUFFLE, server_round, pid),
        qat_spec=cfg.uplink_spec(),
        qat_rng=seeding.numpy_rng(cfg.seed, seeding.Purpose.QAT, server_round, pid),
    )
    metrics = MetricRecord(
        {
            "train-loss": stats.loss,
            "num-examples": stats.num_examples,
            "bench.t0": t0,
            "bench.t1": time.time(),
            "bench.train-s": stats.seconds,
            "bench.threads": torch.get_num_threads(),
        }
    )
    content = RecordDict({"arrays": record_from_numpy(state_numpy(model)), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def make_client_app() -> Any:
    """The ClientApp: :func:`fedquant.flower.fedquant_mod` around the simulator's client.

    Its settings travel in the train ConfigRecord (:data:`RUN_KEY`), its
    partition is the node config's ``partition-id``.
    """
    from flwr.clientapp import ClientApp

    from fedquant.flower import fedquant_mod

    app = ClientApp(mods=[fedquant_mod])
    app.train()(_train)
    return app


def _timing_metrics(contents: list[Any], weighted_by_key: str) -> Any:
    """Aggregate train metrics: mean loss, and the clients' first start / last end / seconds."""
    from flwr.app import MetricRecord

    ms = [next(iter(c.metric_records.values())) for c in contents]
    return MetricRecord(
        {
            "train-loss": float(np.mean([float(m["train-loss"]) for m in ms])),
            "bench.t0": min(float(m["bench.t0"]) for m in ms),
            "bench.t1": max(float(m["bench.t1"]) for m in ms),
            "bench.train-s": float(sum(float(m["bench.train-s"]) for m in ms)),
            "bench.threads": max(int(m["bench.threads"]) for m in ms),
            "bench.clients": len(ms),
        }
    )


# --------------------------------------------------------------------------- the comparison


def _check(cfg: RunConfig) -> None:
    unsupported = {
        "client_fraction": cfg.client_fraction != 1.0,
        "failure_rate": cfg.failure_rate != 0.0,
        "hostile_fraction": cfg.hostile_fraction != 0.0,
        "upload": cfg.upload != "weights",
        "device": cfg.device != "cpu",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(
            bad[0],
            "simulator_vs_flower compares plain runs: every client each round, no simulated "
            "failures or hostile clients, weight upload, CPU; got "
            + ", ".join(f"{k}={getattr(cfg, k)!r}" for k in bad),
        )


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower's INFO logs off, telemetry and a Ray warning off; the environment restored after.

    Flower's Ray backend adds this process's ``sys.path`` to ``PYTHONPATH``
    (for its workers); that is undone too.
    """
    quiet = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    saved_env = {k: os.environ.get(k) for k in ("PYTHONPATH", *quiet)}
    os.environ.update(quiet)
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_simulator(
    cfg: RunConfig, rounds: int, dataset: Any
) -> tuple[Row, list[float], dict[str, np.ndarray]]:
    """Our side: (timing row, accuracy per round, final global model)."""
    from fedquant.fl.simulation import Simulation

    t_call = time.perf_counter()
    sim = Simulation(cfg.with_(rounds=rounds, eval_every=1), dataset=dataset)
    setup = time.perf_counter() - t_call
    state = sim.new_state()
    per_round, train, accs = [], [], []
    while state.round < rounds:
        m = sim.run_round(state)
        per_round.append(m.seconds_round)
        train.append(m.seconds_train)
        accs.append(m.test["accuracy"])
    total = time.perf_counter() - t_call
    row: Row = {
        "runtime": "fedquant simulator",
        "startup_s": setup,
        "round_s": per_round,
        "train_s": train,
        "total_s": total,
        "threads": _torch_threads(),
    }
    return row, accs, state.global_state


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def run_flower(
    cfg: RunConfig,
    rounds: int,
    dataset: Any,
    initial_state: dict[str, np.ndarray],
    *,
    client_cpus: int,
    n_train: int,
    n_test: int,
) -> tuple[Row, list[float], dict[str, np.ndarray]]:
    """Flower's side: (timing row, accuracy per round, final global model)."""
    from flwr.app import ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedquant.fl.aggregation import relative_cap
    from fedquant.fl.client import evaluate, load_numpy_state
    from fedquant.fl.data import to_tensors
    from fedquant.fl.simulation import make_model
    from fedquant.flower import QuantizedFedAvg
    from fedquant.flower.records import numpy_from_record, record_from_numpy

    tensors = to_tensors(dataset)
    eval_model = make_model(cfg, dataset.input_shape, dataset.num_classes)
    marks: dict[str, Any] = {"eval_in": {}, "eval_out": {}, "acc": {}}
    run_json = json.dumps(
        {"config": {k: v for k, v in cfg.to_dict().items() if v is not None}}
        | {"n_train": n_train, "n_test": n_test}
    )

    def central_evaluate(server_round: int, arrays: Any) -> Any:
        marks["eval_in"][server_round] = time.time()
        load_numpy_state(eval_model, numpy_from_record(arrays))
        loss, acc = evaluate(eval_model, tensors.test_x, tensors.test_y)
        marks["acc"][server_round] = acc
        marks["eval_out"][server_round] = time.time()
        return MetricRecord({"accuracy": acc, "loss": loss})

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        n = cfg.num_clients
        strategy = QuantizedFedAvg(
            cfg.uplink_spec(),
            aggregation=cfg.aggregation,
            downlink=cfg.downlink_spec(),
            seed=cfg.seed,
            max_weight=relative_cap(cfg.weight_cap, n),
            mse_floor_rel=cfg.mse_floor,
            norm_bound=cfg.norm_bound,
            trim_fraction=cfg.trim_fraction,
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=n,
            min_evaluate_nodes=0,
            min_available_nodes=n,
            train_metrics_aggr_fn=_timing_metrics,
        )
        marks["result"] = strategy.start(
            grid=grid,
            initial_arrays=record_from_numpy(initial_state),
            num_rounds=rounds,
            train_config=ConfigRecord({RUN_KEY: run_json}),
            evaluate_fn=central_evaluate,
        )

    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1},
    }
    import ray

    with _quiet_flower():
        t_call = time.time()
        try:
            run_simulation(
                server_app=server_app,
                client_app=make_client_app(),
                num_supernodes=cfg.num_clients,
                backend_config=backend_config,  # type: ignore[arg-type]
            )
        finally:
            t_return = time.time()
            if ray.is_initialized():
                ray.shutdown()
    result = marks.get("result")
    if result is None or len(marks["eval_out"]) != rounds + 1:
        raise FedquantError(
            f"run_simulation ended after {len(marks['eval_out']) - 1} of {rounds} rounds"
        )
    train = result.train_metrics_clientapp
    first_start = float(train[1]["bench.t0"])
    ends = [marks["eval_out"][r] for r in range(rounds + 1)]
    per_round = [ends[r] - ends[r - 1] for r in range(1, rounds + 1)]
    row: Row = {
        "runtime": f"Flower simulation engine (Ray), {client_cpus} CPU(s) per client",
        "client_cpus": client_cpus,
        "startup_s": first_start - t_call,
        "round_s": per_round,
        # round 1 less the startup: what it took once the first client began
        "round1_after_startup_s": ends[1] - first_start,
        "round0_eval_s": marks["eval_out"][0] - marks["eval_in"][0],
        "train_s": [float(train[r]["bench.train-s"]) for r in range(1, rounds + 1)],
        "shutdown_s": t_return - ends[-1],
        "total_s": t_return - t_call,
        "threads": int(train[1]["bench.threads"]),
    }
    accs = [float(marks["acc"][r]) for r in range(1, rounds + 1)]
    return row, accs, numpy_from_record(result.arrays)


def _summarize(row: Row) -> None:
    rs = row["round_s"]
    steady = rs[1:] if len(rs) > 1 else rs
    row["round_median_s"] = float(np.median(steady))
    row["rounds_in_median"] = "2.." + str(len(rs)) if len(rs) > 1 else "1"
    row["train_median_s"] = float(np.median(row["train_s"][1:] if len(rs) > 1 else row["train_s"]))
    row["not_training_median_s"] = row["round_median_s"] - row["train_median_s"]


def simulator_vs_flower(
    cfg: RunConfig,
    *,
    rounds: int = 5,
    client_cpus: Sequence[int] = (2, 1),
    n_train: int = 0,
    n_test: int = 0,
    log: Log | None = None,
) -> dict[str, Any]:
    """Wall time of ``rounds`` rounds of ``cfg`` on the simulator and on Flower+Ray.

    Parameters
    ----------
    cfg : RunConfig
        The run, e.g. ``RunConfig()`` (10 clients, the paper's CNN and 4-2-2-4
        uplink on the embedded MNIST subset). Every client trains every round (``client_fraction`` 1, no failures), weight upload, CPU.
    rounds : int, default 5
    client_cpus : sequence of int, default (2, 1)
        One Flower run per value: the CPUs Ray reserves per client (Flower's
        default is 2: on 2 cores, one client at a time, like the simulator;
        1 runs two clients at once with one torch thread each).
    n_train, n_test : int, default 0
        Use only the first examples of each split (smoke runs); 0 = all.
    log : callable, optional

    Returns
    -------
    dict
        ``rows``: the simulator's row, then one per Flower run, with
        ``startup_s``, ``round_s`` (per round), ``round_median_s`` (rounds
        2..N), ``train_s``, ``total_s``, the load average, and for Flower the
        ratios to the simulator measured in the same call
        (``total_vs_simulator``, ``round_vs_simulator``) and the largest
        per-round accuracy difference and model difference. ``skipped`` is
        set (and there are no rows) when Flower's simulation engine is not
        installed.
    """
    if rounds < 1:
        raise ConfigError("rounds", f"{rounds} is not a positive integer")
    cpus = os.cpu_count() or 1
    for c in client_cpus:
        if not 1 <= c <= cpus:
            raise ConfigError("client_cpus", f"{c} is not between 1 and this machine's {cpus}")
    _check(cfg)
    out: dict[str, Any] = {
        "rounds": rounds,
        "num_clients": cfg.num_clients,
        "bits": cfg.bits,
        "aggregation": cfg.aggregation,
        "rows": [],
    }
    why = flower_missing()
    if why is not None:
        out["skipped"] = why
        return out
    import flwr
    import ray

    out["versions"] = {"flwr": flwr.__version__, "ray": ray.__version__}
    from fedquant.fl.data import load_dataset

    data = small_dataset(load_dataset(cfg.dataset, cfg.data_root, cfg.cache_dir), n_train, n_test)
    out["train_examples"] = len(data.train_y)
    load_before = load_average()
    sim_row, sim_acc, sim_model = run_simulator(cfg, rounds, data)
    sim_row["load_before"], sim_row["load_after"] = load_before, load_average()
    sim_row["final_accuracy"] = sim_acc[-1]
    _summarize(sim_row)
    out["rows"].append(sim_row)
    if log is not None:
        log(
            f"  simulator: startup {sim_row['startup_s']:.2f} s, round {sim_row['round_median_s']:.2f}"
            f" s, total {sim_row['total_s']:.1f} s (load {load_before})"
        )
    from fedquant.fl.simulation import Simulation

    initial = Simulation(cfg, dataset=data).initial_state
    for c in client_cpus:
        load_before = load_average()
        try:
            row, acc, model = run_flower(
                cfg, rounds, data, initial, client_cpus=c, n_train=n_train, n_test=n_test
            )
        except (Exception, SystemExit) as e:  # Ray may fail to start in a sandbox: say so
            out["rows"].append(
                {
                    "runtime": f"Flower simulation engine (Ray), {c} CPU(s) per client",
                    "client_cpus": c,
                    "error": f"{type(e).__name__}: {e}",
                    "load_before": load_before,
                }
            )
            if log is not None:
                log(f"  flower ({c} cpus/client): failed: {type(e).__name__}: {e}")
            continue
        row["load_before"], row["load_after"] = load_before, load_average()
        row["final_accuracy"] = acc[-1]
        row["max_accuracy_difference"] = float(
            max(abs(a - b) for a, b in zip(acc, sim_acc, strict=True))
        )
        row["max_model_difference"] = float(
            max(
                float(np.max(np.abs(model[k].astype(np.float64) - sim_model[k])))
                if model[k].size
                else 0.0
                for k in sim_model
            )
        )
        _summarize(row)
        row["total_vs_simulator"] = row["total_s"] / sim_row["total_s"]
        row["round_vs_simulator"] = row["round_median_s"] / sim_row["round_median_s"]
        row["startup_minus_simulator_s"] = row["startup_s"] - sim_row["startup_s"]
        out["rows"].append(row)
        if log is not None:
            log(
                f"  flower ({c} cpus/client): startup {row['startup_s']:.1f} s, round "
                f"{row['round_median_s']:.2f} s ({row['round_vs_simulator']:.2f}x), total "
                f"{row['total_s']:.1f} s ({row['total_vs_simulator']:.2f}x) (load {load_before})"
            )
    return out
