"""The federated simulator: many clients in one process, the paper's method end to end.

One round (:meth:`Simulation.run_round`) runs six named steps, each returning
a record of :mod:`fedquant.fl.round` (:meth:`~Simulation.sample`,
:meth:`~Simulation.broadcast_step`, :meth:`~Simulation.local_work`,
:meth:`~Simulation.admit_replies`, :meth:`~Simulation.aggregate_step`,
:meth:`~Simulation.evaluate_step`), and ends in a
:class:`~fedquant.fl.round.RoundRecord`, whose row goes to ``metrics.jsonl``:

1. the server samples ``client_fraction * N`` clients (seeded by round) and
   encodes the global model once for the broadcast (float32, or quantized with
   the downlink spec); downlink traffic = payload length x sampled clients;
2. each client loads the broadcast into the one shared working model, trains
   locally on its data for the run's :class:`~fedquant.fl.task.Task`
   (:func:`fedquant.fl.client.train_local`; the image classifier by default),
   and encodes its full state with the uplink spec, or its own width under
   ``client_bits`` (:func:`fedquant.quant.codec.encode_with_stats`);
   uplink traffic = the payload lengths. Clients may fail (``failure_rate``).
   With ``batched_clients=K`` the clients that do not fail are trained K at a
   time as one stacked model (:func:`fedquant.fl.batched.train_batched`, same
   mini-batches, equal up to float round-off), then encoded one by one as above.
   With ``upload="delta"`` a client encodes its update from the broadcast
   instead, plus its error-feedback residual (:mod:`fedquant.fl.updates`; the
   residuals are :attr:`RunState.residuals`, checkpointed with the model);
3. the server admits each payload (:mod:`fedquant.fl.ingest`), aggregates the
   admitted ones (:func:`fedquant.fl.aggregation.aggregate_payloads`) if at
   least ``min_clients`` arrived (adding aggregated deltas to its model), steps
   its model with the server optimizer if one is set (:mod:`fedquant.fl.server_opt`;
   its state is :attr:`RunState.server_opt`, checkpointed too), and evaluates
   every ``eval_every`` rounds with the task's ``evaluate``.

:func:`run_to_dir` runs a simulation and writes the results directory exactly
as ``fedquant run`` does (the CLI calls it).

Only orchestration and bookkeeping live here; the math is in
:mod:`fedquant.quant` and :mod:`fedquant.fl.aggregation`. All randomness is
derived from ``(seed, round, client)`` (:mod:`fedquant.fl.seeding`), so a run
resumed from a checkpoint ends exactly like an uninterrupted one.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedquant.errors import ConfigError, DataError
from fedquant.fl import adversary, seeding
from fedquant.fl.aggregation import AggregationRule, aggregate_payloads, parse_rule, relative_cap
from fedquant.fl.batched import state_to_numpy, train_batched, unsupported_reason
from fedquant.fl.client import (
    encode_model,
    load_numpy_state,
    state_numpy,
    train_local,
    upload_meta,
)
from fedquant.fl.config import Device, LrSchedule, RunConfig
from fedquant.fl.data import Dataset, load_dataset, to_tensors
from fedquant.fl.ingest import Reference, admit
from fedquant.fl.models import build_model
from fedquant.fl.names import TEXT_DATASETS
from fedquant.fl.partition import partition
from fedquant.fl.results import Checkpoint, ResultsDir
from fedquant.fl.robust import byzantine_count
from fedquant.fl.round import (
    Admitted,
    AggregateSummary,
    Broadcast,
    ClientUpload,
    LocalWork,
    Reply,
    RoundRecord,
    Sample,
    TrainedClient,
)
from fedquant.fl.seeding import Purpose
from fedquant.fl.task import (
    ClientOptimizer,
    FederatedData,
    Task,
    TrainConfig,
    federate,
    image_classification_task,
)
from fedquant.fl.text_task import load_text_workload
from fedquant.fl.updates import Upload, apply_delta, encode_delta, payload_delta_names
from fedquant.quant import codec
from fedquant.quant.spec import QuantSpec

log = logging.getLogger("fedquant.simulation")

#: metrics that are timings (they differ between otherwise identical runs)
TIMING_KEYS = ("seconds_train", "seconds_codec", "seconds_eval", "seconds_round")


def round_lr(cfg: RunConfig, round_: int) -> float:
    """The clients' learning rate in round ``round_`` (1-based) under ``cfg.lr_schedule``."""
    if cfg.lr_schedule is LrSchedule.COSINE:
        t = min(max(round_ - 1, 0), cfg.rounds)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t / cfg.rounds))
    if cfg.lr_schedule is LrSchedule.STEP:
        return cfg.lr * cfg.lr_gamma ** ((max(round_, 1) - 1) // cfg.lr_step_rounds)
    return cfg.lr


def train_config(cfg: RunConfig, round_: int = 1) -> TrainConfig:
    """The clients' local-training settings of ``cfg`` in round ``round_`` (the simulator's
    and the Flower app's): ``cfg``'s fields of :class:`TrainConfig`, with the round's
    learning rate."""
    values = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    return TrainConfig(**{**values, "lr": round_lr(cfg, round_)})


def client_parts(cfg: RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    """``cfg``'s partition of samples with ``labels`` among its clients (seeded)."""
    return partition(
        labels,
        cfg.num_clients,
        cfg.partition,
        alpha=cfg.alpha,
        shards_per_client=cfg.shards_per_client,
        seed=seeding.int_seed(cfg.seed, Purpose.PARTITION),
    )


def make_model(cfg: RunConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The configured model: a registered name or ``"package.module:factory"``."""
    if ":" in cfg.model:
        mod_name, _, attr = cfg.model.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError("model", f"cannot load {cfg.model!r}: {e}") from e
        if not callable(factory):
            raise ConfigError(
                "model",
                f"{cfg.model!r} is a {type(factory).__name__}, not a factory; expected "
                "'package.module:factory' with factory(in_shape, num_classes) -> nn.Module",
            )
        try:
            model = factory(in_shape, num_classes)
        except Exception as e:  # the user's code: one line naming it, not a traceback
            raise ConfigError(
                "model", f"{cfg.model!r}({in_shape}, {num_classes}) failed: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(model, nn.Module):
            raise ConfigError(
                "model", f"{cfg.model!r} returned {type(model).__name__}, not a torch.nn.Module"
            )
        return model
    return build_model(cfg.model, in_shape, num_classes)  # type: ignore[arg-type]


@dataclass
class RunState:
    """Everything that changes between rounds (what a checkpoint holds)."""

    round: int
    global_state: dict[str, np.ndarray]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    #: error feedback (``upload="delta"``): client id -> its residual per quantized tensor
    residuals: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    #: the server optimizer's state (:mod:`fedquant.fl.server_opt`; empty for ``none``)
    server_opt: dict[str, np.ndarray] = field(default_factory=dict)


#: a custom workload: ``cfg -> (FederatedData, Task)`` (see :data:`WORKLOADS`)
WorkloadLoader = Callable[[RunConfig], tuple[FederatedData, Task]]

#: data set name -> loader of a non-image workload, or ``"package.module:function"``
#: naming one (imported when first used). ``Simulation(cfg)`` uses the loader when
#: ``cfg.dataset`` is one of these names (the config's ``DATASETS`` must accept the name).
WORKLOADS: dict[str, WorkloadLoader | str] = {name: load_text_workload for name in TEXT_DATASETS}


def workload_loader(name: str) -> WorkloadLoader:
    """The loader :data:`WORKLOADS` registers for ``name`` (importing it if given by name)."""
    entry = WORKLOADS[name]
    if isinstance(entry, str):
        mod_name, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError("dataset", f"cannot load the workload {entry!r}: {e}") from e
        WORKLOADS[name] = entry
    return entry


class Simulation:
    """A federated run of ``cfg`` in this process.

    Parameters
    ----------
    cfg : RunConfig
    dataset : fedquant.fl.data.Dataset, optional
        An image data set to use instead of loading ``cfg.dataset`` (normalized
        and partitioned as ``cfg`` says).
    model : torch.nn.Module, optional
        Use this (untrained) model instead of building ``cfg.model``; any
        module whose state dict the codec can carry works.
    task : Task, optional
        What the clients train and the server evaluates (default:
        :func:`~fedquant.fl.task.image_classification_task`).
    data : FederatedData or (train, test), optional
        The clients' data: a :class:`~fedquant.fl.task.FederatedData` (e.g. a
        natural partition, one data set per client), or a pair of training and
        test data (each a :class:`torch.utils.data.Dataset`, a tensor or a
        tuple of tensors, used as they are) that is split among
        ``cfg.num_clients`` clients by :func:`~fedquant.fl.task.federate`.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        dataset: Dataset | None = None,
        model: nn.Module | None = None,
        task: Task | None = None,
        data: FederatedData | tuple[Any, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        if cfg.device is Device.CUDA and not torch.cuda.is_available():
            raise ConfigError("device", "'cuda' was requested but torch sees no CUDA device")
        if cfg.device is Device.MPS and not torch.backends.mps.is_available():
            raise ConfigError("device", "'mps' was requested but torch sees no MPS device")
        if dataset is not None and data is not None:
            raise ConfigError("data", "pass either dataset= (an image data set) or data=, not both")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device.value)
        self.task = task if task is not None else image_classification_task()
        #: the image data set (``None`` for a custom workload)
        self.dataset: Dataset | None = None
        if data is None and dataset is None and cfg.dataset in WORKLOADS:
            data, loaded_task = workload_loader(cfg.dataset)(cfg)
            self.task = task if task is not None else loaded_task
        if data is None:
            self.dataset = (
                dataset
                if dataset is not None
                else load_dataset(cfg.dataset, cfg.data_root, cfg.cache_dir)
            )
            self.data = self._image_data(self.dataset)
        elif isinstance(data, FederatedData):
            self.data = data
        elif isinstance(data, tuple) and len(data) == 2:
            self.data = federate(
                data[0],
                data[1],
                num_clients=cfg.num_clients,
                scheme=cfg.partition,
                alpha=cfg.alpha,
                shards_per_client=cfg.shards_per_client,
                seed=seeding.int_seed(cfg.seed, Purpose.PARTITION),
            )
        else:
            raise DataError(
                f"data: expected FederatedData or a (train, test) pair, got {type(data).__name__}"
            )
        if self.data.num_clients != cfg.num_clients:
            raise ConfigError(
                "num_clients",
                f"is {cfg.num_clients} but the data has {self.data.num_clients} clients; "
                f"expected num_clients={self.data.num_clients}",
            )
        if model is None:
            if self.data.input_shape is None or self.data.num_classes is None:
                raise ConfigError(
                    "model",
                    f"cannot build {cfg.model!r}: the data gives no input shape or number of "
                    "classes; pass model= to Simulation",
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seeding.int_seed(cfg.seed, Purpose.INIT))
                model = make_model(cfg, self.data.input_shape, self.data.num_classes)
        self.model = model.to(self.device)
        self.initial_state = state_numpy(self.model)
        self.reference = Reference.from_state(self.initial_state)
        self.uplink = cfg.uplink_spec()
        self.downlink = cfg.downlink_spec()
        self.rule = parse_rule(cfg.aggregation)
        self.train_cfg = train_config(cfg)
        self.server_opt = cfg.server_optimizer_obj()
        #: the tensors the server optimizer steps: the model's floating-point parameters
        self.server_opt_names = tuple(
            n for n, p in self.model.named_parameters() if p.is_floating_point()
        )
        self.hostile = self._hostile_clients()
        #: this round's trained (unquantized) models of the model-poisoning attackers
        self._trained_attackers: dict[int, dict[str, np.ndarray]] = {}
        #: client id -> its uplink spec where ``client_bits`` sets widths (else the run's)
        self.client_specs = self._client_specs()
        #: why ``batched_clients`` could not be used (clients then train one after another)
        self.batched_fallback: str | None = None
        if cfg.batched_clients > 0:
            self.batched_fallback = self._batched_reason()
            if self.batched_fallback is not None:
                log.warning(
                    "batched_clients=%d: training clients one after another instead: %s",
                    cfg.batched_clients,
                    self.batched_fallback,
                )
        # validate the spec against the model now, not in round 1
        shapes = {k: (v.shape, v.dtype.kind == "f") for k, v in self.initial_state.items()}
        for spec in {id(s): s for s in (self.uplink, *self.client_specs.values())}.values():
            spec.resolve(shapes)

    def _image_data(self, dataset: Dataset) -> FederatedData:
        """An image data set normalized, partitioned by ``cfg``, as tensor slices per client."""
        cfg = self.cfg
        tensors = to_tensors(dataset)
        parts = client_parts(cfg, dataset.train_y)
        # the train split in client order: a client's examples are a slice of it (a
        # view), not rows gathered again every round
        offsets = np.cumsum([0, *(p.size for p in parts)])
        order = torch.from_numpy(np.concatenate([*parts, np.zeros(0, np.int64)]))
        train_x, train_y = tensors.train_x[order], tensors.train_y[order]
        clients = [
            TensorDataset(train_x[lo:hi], train_y[lo:hi])
            for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
        ]
        return FederatedData(
            clients=clients,
            test=TensorDataset(tensors.test_x, tensors.test_y),
            name=dataset.name,
            num_classes=dataset.num_classes,
            input_shape=dataset.input_shape,
            labels=[dataset.train_y[p] for p in parts],
        )

    def _batched_reason(self) -> str | None:
        """Why the clients cannot train as one stacked model, or ``None``."""
        if self.task.loss is not image_classification_task().loss or self.task.train is not None:
            return (
                "a custom task's loss or training loop (the batched trainer is cross-entropy only)"
            )
        if self.train_cfg.optimizer != ClientOptimizer.SGD or self.train_cfg.prox_mu > 0:
            return "the batched trainer implements plain SGD only (no adam, adamw or prox_mu)"
        if not all(isinstance(c, TensorDataset) and len(c.tensors) == 2 for c in self.data.clients):
            return "the clients' data are not (input, label) tensor data sets"
        return unsupported_reason(self.model, self.train_cfg, self._client_data(0)[0][:2])

    def _client_specs(self) -> dict[int, QuantSpec]:
        """Per client, its uplink spec under ``client_bits`` (seeded); empty when unset."""
        cfg = self.cfg
        widths = cfg.client_widths()
        if not widths:
            return {}
        n = cfg.num_clients
        exact = [f * n for _, f in widths]
        counts = [math.floor(e) for e in exact]
        # largest remainders get the clients left over (ties: the order given)
        for i in sorted(range(len(widths)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
            counts[i] += 1
        order = seeding.numpy_rng(cfg.seed, Purpose.CLIENT_BITS).permutation(n)
        specs = {b: cfg.with_(bits=str(b)).uplink_spec() for b, _ in widths}
        out: dict[int, QuantSpec] = {}
        pos = 0
        for (bits, _), k in zip(widths, counts, strict=True):
            for c in order[pos : pos + k]:
                out[int(c)] = specs[bits]
            pos += k
        return out

    def client_spec(self, client: int) -> QuantSpec:
        """The uplink spec of ``client``."""
        return self.client_specs.get(client, self.uplink)

    @property
    def parts(self) -> list[np.ndarray]:
        """Per client, the indices of its samples (positions in its own data set)."""
        return [np.arange(n, dtype=np.int64) for n in self.data.sizes]

    @property
    def label_counts(self) -> np.ndarray:
        """``(clients, classes)`` label counts (an empty ``(clients, 0)`` array without labels)."""
        counts = self.data.label_counts()
        return counts if counts is not None else np.zeros((self.data.num_clients, 0), np.int64)

    def describe_data(self) -> dict[str, Any]:
        """The data summary of ``meta.json``."""
        if self.dataset is not None:
            return {
                "name": self.dataset.name,
                "train": int(self.dataset.train_y.size),
                "test": int(self.dataset.test_y.size),
                "classes": list(self.dataset.classes),
            }
        return {
            "name": self.data.name,
            "train": int(sum(self.data.sizes)),
            "test": len(self.data.test),  # type: ignore[arg-type]
            "task": self.task.name,
            **self.data.meta,
        }

    def _hostile_clients(self) -> dict[int, str]:
        """Client id -> hostile mode for the ``hostile_fraction`` of clients (seeded)."""
        cfg = self.cfg
        k = round(cfg.hostile_fraction * cfg.num_clients)
        if k == 0:
            return {}
        ids = seeding.numpy_rng(cfg.seed, Purpose.HOSTILE).permutation(cfg.num_clients)[:k]
        modes = adversary.MODES if cfg.hostile_mode == "mixed" else (cfg.hostile_mode,)
        return {int(c): modes[i % len(modes)] for i, c in enumerate(sorted(ids))}

    # ------------------------------------------------------------------ rounds

    def new_state(self) -> RunState:
        return RunState(round=0, global_state={k: v.copy() for k, v in self.initial_state.items()})

    def sample_clients(self, round_: int) -> np.ndarray:
        n = self.cfg.num_clients
        m = max(1, round(self.cfg.client_fraction * n))
        if m >= n:
            return np.arange(n)
        rng = seeding.numpy_rng(self.cfg.seed, Purpose.SAMPLE, round_)
        return np.sort(rng.choice(n, size=m, replace=False))

    def sample(self, round_: int) -> Sample:
        """Step 1: the round's clients (:meth:`sample_clients`) and which of them fail
        (``failure_rate``, seeded by round)."""
        cfg = self.cfg
        clients = self.sample_clients(round_)
        if cfg.failure_rate <= 0:
            return Sample(clients, clients[:0])
        fail_rng = seeding.numpy_rng(cfg.seed, Purpose.FAILURE, round_)
        return Sample(clients, clients[fail_rng.random(clients.size) < cfg.failure_rate])

    def broadcast(self, state: RunState, round_: int) -> bytes:
        """The server's downlink payload for this round."""
        spec = self.downlink if self.downlink is not None else QuantSpec(default_bits=32)
        return codec.encode(
            state.global_state,
            spec,
            seed=seeding.seed_sequence(self.cfg.seed, Purpose.DOWNLINK, round_),
            meta={"round": round_},
        )

    def broadcast_step(self, state: RunState, round_: int) -> Broadcast:
        """Step 2: the downlink payload, the model the clients start from and the round's
        rotation key."""
        down = self.broadcast(state, round_)
        start = state.global_state if self.downlink is None else codec.decode(down).tensors
        return Broadcast(round_, down, start, seeding.rotation_key(self.cfg.seed, round_))

    @property
    def clients_at_once(self) -> int:
        """How many clients train at once (0: one after another, the loop)."""
        return self.cfg.batched_clients if self.batched_fallback is None else 0

    def _client_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(inputs, labels)`` tensors of a client (tensor data sets only)."""
        ds = self.data.clients[client]
        assert isinstance(ds, TensorDataset)
        x, y = ds.tensors
        if self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def train_clients(
        self, clients: list[int], start: Mapping[str, np.ndarray], round_: int
    ) -> dict[int, TrainedClient]:
        """Train ``clients`` from ``start`` at once (:func:`~fedquant.fl.batched.train_batched`).

        Returns client id -> its trained state (NumPy arrays) and statistics, with
        the same mini-batches as :meth:`client_payload`'s one-by-one training.
        """
        load_numpy_state(self.model, start)
        res = train_batched(
            self.model,
            [self._client_data(c) for c in clients],
            train_config(self.cfg, round_),
            generators=[
                seeding.torch_generator(self.cfg.seed, Purpose.SHUFFLE, round_, c) for c in clients
            ],
        )
        return {
            c: TrainedClient(state_to_numpy(st), stats)
            for c, st, stats in zip(clients, res.states, res.stats, strict=True)
        }

    def client_payload(
        self,
        client: int,
        start: Mapping[str, np.ndarray],
        round_: int,
        *,
        residuals: dict[int, dict[str, np.ndarray]] | None = None,
        trained: TrainedClient | None = None,
    ) -> ClientUpload:
        """Train client ``client`` from ``start`` and encode its upload.

        With ``upload="delta"`` the payload is the update from ``start``; with
        error feedback the client's entry of ``residuals`` is read and replaced.
        ``trained`` is the client's state and statistics if it was already trained
        (:meth:`train_clients`); then nothing is trained here and the upload's
        ``train_seconds`` are 0.
        """
        cfg = self.cfg
        spec = self.client_spec(client)
        if trained is None:
            load_numpy_state(self.model, start)
            data = self.data.clients[client]
            if self.device.type != "cpu" and isinstance(data, TensorDataset):
                data = TensorDataset(*(t.to(self.device) for t in data.tensors))
            stats = train_local(
                self.model,
                data,
                self.task,
                train_config(cfg, round_),
                seeding.torch_generator(cfg.seed, Purpose.SHUFFLE, round_, client),
                qat_spec=spec,
                qat_rng=seeding.numpy_rng(cfg.seed, Purpose.QAT, round_, client)
                if self.train_cfg.qat
                else None,
            )
            train_secs = stats.seconds
        else:  # the model carries the client's trained state from here on, as in the loop
            load_numpy_state(self.model, trained.state)
            stats, train_secs = trained.stats, 0.0
        meta = upload_meta(
            round_,
            client,
            disclose_num_examples=stats.num_examples
            if self.rule is AggregationRule.FEDAVG
            else None,
        )
        seed = seeding.seed_sequence(cfg.seed, Purpose.UPLINK, round_, client)
        if cfg.upload is Upload.DELTA:
            up = encode_delta(
                state_numpy(self.model),
                start,
                spec,
                seed=seed,
                meta=meta,
                residual_in=None if residuals is None else residuals.get(client),
                error_feedback=cfg.error_feedback,
                shared_key=self._uplink_key(round_),
            )
            if cfg.error_feedback and residuals is not None:
                residuals[client] = up.residual
            payload = up.result.payload
        else:
            payload = encode_model(
                self.model, spec, seed=seed, meta=meta, shared_key=self._uplink_key(round_)
            ).payload
        return ClientUpload(client, payload, stats.loss, train_secs)

    def _uplink_key(self, round_: int) -> int | None:
        """The round's rotation key for the uplink encoder (``None``: the spec does not rotate)."""
        return seeding.rotation_key(self.cfg.seed, round_) if self.uplink.rotation else None

    def local_work(self, state: RunState, sample: Sample, cast: Broadcast) -> LocalWork:
        """Step 3: every working client of ``sample`` trains from ``cast.start`` and encodes its
        upload (``batched_clients`` at a time where set); a model-poisoning attacker's
        trained model is kept for :meth:`replies`."""
        k = self.clients_at_once
        todo = sample.working  # who trains, in order
        trained: dict[int, TrainedClient] = {}
        uploads: list[ClientUpload] = []
        train_s = codec_s = 0.0
        for pos, c in enumerate(todo):
            if k and c not in trained:  # train this client and the next k - 1 at once
                t0 = time.perf_counter()
                trained.update(self.train_clients(todo[pos : pos + k], cast.start, cast.round))
                train_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            up = self.client_payload(
                c, cast.start, cast.round, residuals=state.residuals, trained=trained.pop(c, None)
            )
            train_s += up.train_seconds
            if self.hostile.get(c) in adversary.ATTACKS:  # poisons its trained model
                self._trained_attackers[c] = state_numpy(self.model)
            uploads.append(up)
            codec_s += time.perf_counter() - t0 - up.train_seconds  # encode
        return LocalWork(uploads, train_s, codec_s)

    def replies(self, sent: Sequence[ClientUpload], cast: Broadcast) -> Iterator[Reply]:
        """What reaches the server from the round's clients: each honest payload of
        ``sent``, or a hostile client's corruption or poisoned model (``hostile_fraction``
        / ``hostile_mode``, see :mod:`fedquant.fl.adversary`)."""
        shared_key = cast.shared_key
        honest: list[dict[str, np.ndarray]] | None = None
        for up in sent:
            mode = self.hostile.get(up.client)
            payload = up.payload
            if mode in adversary.ATTACKS:
                if mode in adversary.ROUND_ATTACKS and honest is None:  # the attackers collude
                    honest = [codec.decode(u.payload, shared_key=shared_key).tensors for u in sent]
                payload = self._poisoned(up, mode, cast, honest, sent)
            elif mode is not None and mode != "duplicate":
                payload = adversary.corrupt(payload, mode, shared_key=shared_key)
            reply = Reply(up.client, str(up.client), payload, up.loss)
            yield reply
            if mode == "duplicate":
                yield reply

    def _poisoned(
        self,
        up: ClientUpload,
        mode: str,
        cast: Broadcast,
        honest: list[dict[str, np.ndarray]] | None,
        sent: Sequence[ClientUpload],
    ) -> bytes:
        """An attacker's payload: its trained model (or update) poisoned, then encoded with the
        uplink spec as an honest client would (metadata from its honest payload)."""
        cfg = self.cfg
        client, start, round_, shared_key = up.client, cast.start, cast.round, cast.shared_key
        dec = codec.describe_payload(up.payload, shared_key=shared_key)
        attackers = sum(self.hostile.get(u.client) == mode for u in sent)
        deltas = (
            frozenset(payload_delta_names([dec.info]))
            if cfg.upload is Upload.DELTA
            else frozenset()
        )
        trained = self._trained_attackers.pop(client, None)
        own = (  # without its trained model (a caller's own round loop): what it uploaded
            codec.decode_inspected(dec, shared_key=shared_key).tensors
            if trained is None
            else {
                n: np.asarray(v, np.float32) - np.asarray(start[n], np.float32)
                if n in deltas
                else v
                for n, v in trained.items()
            }
        )
        tensors = adversary.attack(
            mode,
            own,
            start,
            deltas=deltas,
            rng=seeding.numpy_rng(cfg.seed, Purpose.HOSTILE, round_, client),
            honest=honest or (),
            z=adversary.alie_z(len(sent), attackers),
        )
        return codec.encode(
            tensors,
            self.uplink,
            seed=seeding.seed_sequence(cfg.seed, Purpose.UPLINK, round_, client),
            meta=dec.meta,
            shared_key=self._uplink_key(round_),
        )

    def admit_replies(self, sent: Sequence[ClientUpload], cast: Broadcast) -> Admitted:
        """Step 4: every reply (:meth:`replies`) checked by :func:`~fedquant.fl.ingest.admit`;
        FedAvg also refuses a payload whose metadata lacks a valid ``num_examples``."""
        fedavg = self.rule is AggregationRule.FEDAVG
        out = Admitted()
        seen: set[str] = set()
        for reply in self.replies(sent, cast):
            out.received_bytes += len(reply.payload)
            out.replies += 1
            adm = admit(
                reply.client_id,
                reply.payload,
                self.reference,
                seen=seen,
                kind=self.cfg.upload.value,
                shared_key=cast.shared_key,
            )
            reason = adm.reason
            n = None
            if adm.ok and fedavg:
                assert adm.update is not None
                n = adm.update.meta.get("num_examples")
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    reason = f"fedavg needs num_examples (an integer >= 0) in the payload metadata, got {n!r}"
                    log.warning("rejected update from client %s: %s", reply.client_id, reason)
            if reason:
                out.rejected[reply.client_id] = reason
                continue
            assert adm.update is not None
            out.payloads.append(reply.payload)
            out.updates.append(adm.update)
            out.losses.append(reply.loss)
            if isinstance(n, int):
                out.num_examples.append(n)
        return out

    def aggregate_step(
        self, state: RunState, admitted: Admitted, cast: Broadcast
    ) -> AggregateSummary | None:
        """Step 5: aggregate the admitted payloads into ``state``'s global model (then the
        server optimizer's step); ``None``, the model unchanged, below ``min_clients``."""
        cfg = self.cfg
        payloads = admitted.payloads
        if len(payloads) < cfg.min_clients:
            return None
        agg = aggregate_payloads(
            payloads,
            self.rule,
            num_examples=admitted.num_examples if self.rule is AggregationRule.FEDAVG else None,
            max_weight=relative_cap(cfg.weight_cap, len(payloads)),
            mse_floor_rel=cfg.mse_floor,
            inspected=admitted.updates,
            shared_key=cast.shared_key,
            spread=cfg.uses_spread,
            reference=cast.start,
            norm_bound=cfg.norm_bound,
            trim_fraction=cfg.trim_fraction,
            byzantine=byzantine_count(len(payloads), cfg.byzantine_fraction),
        )
        new_global = (
            apply_delta(state.global_state, agg.tensors, payload_delta_names(agg.infos))
            if cfg.upload is Upload.DELTA
            else agg.tensors
        )
        if self.server_opt.active:
            step = self.server_opt.step(
                state.global_state, new_global, self.server_opt_names, state.server_opt
            )
            new_global, state.server_opt = step.model, step.state
        state.global_state = new_global
        first = agg.infos[0]
        quantized = [name for name in first if first[name].bits <= 8]

        def mean_of(attr: str) -> dict[str, float]:
            return {
                name: float(np.mean([getattr(info[name], attr) for info in agg.infos]))
                for name in quantized
            }

        return AggregateSummary(
            clients=len(payloads),
            norm_outliers=len(agg.dropped),
            bits=mean_of("bits") if self.uplink.bit_budget is not None else None,
            mse=mean_of("mse"),
            max_weight_used=float(max(float(w.max()) for w in agg.weights.values())),
        )

    def evaluate_step(self, state: RunState, round_: int) -> dict[str, float]:
        """Step 6: the task's test metrics of the global model every ``eval_every`` rounds
        and after the last (empty in the other rounds)."""
        if round_ % self.cfg.eval_every and round_ != self.cfg.rounds:
            return {}
        load_numpy_state(self.model, state.global_state)
        scores = self.task.evaluate(self.model, self.data.test, self.device)
        return {metric: float(value) for metric, value in scores.items()}

    def run_round(self, state: RunState) -> RoundRecord:
        """Run round ``state.round + 1``, update ``state`` in place, return its record.

        The steps: :meth:`sample` -> :meth:`broadcast_step` -> :meth:`local_work` ->
        :meth:`admit_replies` -> :meth:`aggregate_step` -> :meth:`evaluate_step`. The
        record's :meth:`~fedquant.fl.round.RoundRecord.to_row` is appended to
        ``state.metrics``.
        """
        cfg = self.cfg
        r = state.round + 1
        t_round = time.perf_counter()
        sample = self.sample(r)
        t0 = time.perf_counter()
        cast = self.broadcast_step(state, r)
        codec_s = time.perf_counter() - t0
        work = self.local_work(state, sample, cast)
        codec_s += work.codec_seconds
        t0 = time.perf_counter()
        admitted = self.admit_replies(work.uploads, cast)
        codec_s += time.perf_counter() - t0  # admission (and any attack)
        t0 = time.perf_counter()
        aggregate = self.aggregate_step(state, admitted, cast)
        codec_s += time.perf_counter() - t0
        skipped = None
        if aggregate is None:
            skipped = f"{len(admitted.payloads)} valid replies < min_clients={cfg.min_clients}"
            log.warning("round %d: %s; global model unchanged", r, skipped)
        t0 = time.perf_counter()
        test = self.evaluate_step(state, r)
        eval_s = time.perf_counter() - t0
        prev = state.metrics[-1] if state.metrics else {}
        working = len(work.uploads)
        downlink = len(cast.payload) * working
        record = RoundRecord(
            round=r,
            clients_sampled=int(sample.clients.size),
            clients_failed=int(sample.failed.size),
            rejected=admitted.rejected,
            uplink_bytes=admitted.received_bytes,
            downlink_bytes=downlink,
            uplink_float32_bytes=self.reference.float32_nbytes * admitted.replies,
            train_loss=float(np.mean(admitted.losses)) if admitted.losses else math.nan,
            aggregate=aggregate,
            skipped=skipped,
            test=test,
            cum_uplink_bytes=prev.get("cum_uplink_bytes", 0) + admitted.received_bytes,
            cum_downlink_bytes=prev.get("cum_downlink_bytes", 0) + downlink,
            seconds_train=work.train_seconds,
            seconds_codec=codec_s,
            seconds_eval=eval_s,
            seconds_round=time.perf_counter() - t_round,
        )
        state.round = r
        state.metrics.append(record.to_row())
        return record

    def title(self) -> str:
        """A one-line description of the run (plot titles)."""
        cfg = self.cfg
        bits = f"client bits {cfg.client_bits}" if cfg.client_bits else f"bits {cfg.bits}"
        return (
            f"{self.data.name}, {cfg.num_clients} clients, {bits}, {cfg.method}/{cfg.rounding}, "
            f"{cfg.aggregation}" + (f", {cfg.server_optimizer}" if self.server_opt.active else "")
        )

    def run_to_dir(self, out: str | Path | None = None, **kwargs: Any) -> RunResult:
        """:func:`run_to_dir` of this simulation: run it and write the results directory."""
        return run_to_dir(self, out, **kwargs)

    def run(
        self,
        state: RunState | None = None,
        *,
        on_round: Callable[[RunState, RoundRecord], None] | None = None,
    ) -> RunState:
        """Run the remaining rounds of ``state`` (a new run if ``None``)."""
        state = state if state is not None else self.new_state()
        while state.round < self.cfg.rounds:
            record = self.run_round(state)
            if on_round is not None:
                on_round(state, record)
        return state


def final_metric(metrics: list[dict[str, Any]], metric: str = "accuracy") -> float:
    """The test ``metric`` of the last evaluated round (NaN if none)."""
    key = f"test_{metric}"
    for row in reversed(metrics):
        if row.get(key) is not None:
            return float(row[key])
    return math.nan


def final_accuracy(metrics: list[dict[str, Any]]) -> float:
    """Test accuracy of the last evaluated round (NaN if none)."""
    return final_metric(metrics, "accuracy")


def run_summary(
    metrics: list[dict[str, Any]], task: Task, *, wall_seconds: float, results_dir: str
) -> dict[str, Any]:
    """The figures of ``summary.json``: final and best headline metric, traffic, timings."""
    m = metrics
    timing = {k: float(sum(r.get(k, 0.0) for r in m)) for k in TIMING_KEYS}
    last_up = next((r for r in reversed(m) if r["uplink_bytes"]), m[-1])
    key = f"test_{task.metric}"
    scores = [r[key] for r in m if r.get(key) is not None]
    pick = max if task.higher_is_better else min
    return {
        f"final_{task.metric}": final_metric(m, task.metric),
        f"best_{task.metric}": pick(scores, default=math.nan),
        "rounds": m[-1]["round"],
        "uplink_bytes_per_client_round": last_up["uplink_bytes"]
        / max(1, last_up["clients_aggregated"]),
        "uplink_ratio_vs_float32": last_up["uplink_ratio"],
        "total_uplink_bytes": m[-1]["cum_uplink_bytes"],
        "total_downlink_bytes": m[-1]["cum_downlink_bytes"],
        "wall_seconds": wall_seconds,
        **timing,
        "results_dir": results_dir,
    }


@dataclass
class RunResult:
    """What :meth:`Simulation.run_to_dir` returns."""

    state: RunState
    summary: dict[str, Any]
    path: Path


def start_info(sim: Simulation) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``meta.json`` extras, ``clients.json``) of a run about to start."""
    meta = {
        "dataset": sim.describe_data(),
        "float32_model_bytes": sim.reference.float32_nbytes,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    clients = {"label_counts": sim.label_counts.tolist(), "sizes": [int(n) for n in sim.data.sizes]}
    return meta, clients


def create_results_dir(
    sim: Simulation, out: str | Path | None = None, *, option: str = "out"
) -> ResultsDir:
    """A new results directory under ``out`` (default ``cfg.out``) with the run's
    ``config.toml``, ``meta.json`` and ``clients.json``, all there before round 1
    (see :meth:`ResultsDir.create`); ``option`` names the setting in errors."""
    cfg = sim.cfg
    name = None if sim.dataset is not None else sim.data.name  # a custom workload's name
    meta, clients = start_info(sim)
    return ResultsDir.create(
        str(out if out is not None else cfg.out), cfg, meta, clients, option=option, data_name=name
    )


def resume_state(sim: Simulation, rd: ResultsDir) -> RunState:
    """The state of ``rd``'s last checkpoint, checked against ``sim``'s model and
    configuration (a new run's state if it has none; its start files are then
    written again, so they match the run)."""
    return restore_state(sim, rd, rd.read_checkpoint())


def restore_state(sim: Simulation, rd: ResultsDir, ck: Checkpoint | None) -> RunState:
    """:func:`resume_state` from ``ck``, the checkpoint the caller already read from ``rd``
    (``None``: it has none)."""
    rd.remove_stale_temps()
    if rd.config is None:
        rd.config = sim.cfg
    if ck is None:
        meta, clients = start_info(sim)
        rd.write_start(sim.cfg, meta, clients)
        return sim.new_state()
    rd.check_checkpoint(ck, sim.initial_state)
    return RunState(
        round=ck.round,
        global_state=ck.global_state,
        metrics=ck.metrics,
        residuals=ck.residuals,
        server_opt=ck.server_opt,
    )


def run_to_dir(
    sim: Simulation,
    out: str | Path | None = None,
    *,
    results: ResultsDir | None = None,
    state: RunState | None = None,
    on_round: Callable[[RunState, RoundRecord], None] | None = None,
    title: str | None = None,
) -> RunResult:
    """Run ``sim`` to its last round, writing the results directory as ``fedquant run`` does.

    Parameters
    ----------
    sim : Simulation
    out : str or Path, optional
        Where a new results directory is created (default ``cfg.out``).
    results : ResultsDir, optional
        An existing directory to continue (with ``state``, e.g. from
        :func:`resume_state`) instead of a new one.
    state : RunState, optional
    on_round : callable, optional
        Called after each round's checkpoint is written.
    title : str, optional
        The plots' title.
    """
    rd = results if results is not None else create_results_dir(sim, out)
    #: time spent on the rounds restored from a checkpoint (earlier processes)
    earlier = sum(float(r.get("seconds_round", 0.0)) for r in (state.metrics if state else []))
    start = time.perf_counter()

    def each_round(st: RunState, record: RoundRecord) -> None:
        rd.write_round(
            st.round, st.global_state, st.metrics, residuals=st.residuals, server_opt=st.server_opt
        )
        if on_round is not None:
            on_round(st, record)

    final = sim.run(state, on_round=each_round)
    summary = run_summary(
        final.metrics,
        sim.task,
        wall_seconds=earlier + time.perf_counter() - start,
        results_dir=str(rd.path),
    )
    rd.write_summary(summary)
    rd.write_plots(final.metrics, title if title is not None else sim.title(), sim.task.metric)
    return RunResult(final, summary, rd.path)
