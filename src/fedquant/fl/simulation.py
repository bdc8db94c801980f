"""The federated simulator: many clients in one process, the paper's method end to end.

One round (:meth:`Simulation.run_round`):

1. the server samples ``client_fraction * N`` clients (seeded by round) and
   encodes the global model once for the broadcast (float32, or quantized with
   the downlink spec); downlink traffic = payload length x sampled clients;
2. each client loads the broadcast into the one shared working model, trains
   locally (:func:`fedquant.fl.client.train_local`), and encodes its full state
   with the uplink spec (:func:`fedquant.quant.codec.encode_with_stats`);
   uplink traffic = the payload lengths. Clients may fail (``failure_rate``).
   With ``batched_clients=K`` the clients that do not fail are trained K at a
   time as one stacked model (:func:`fedquant.fl.batched.train_batched`, same
   mini-batches, equal up to float round-off), then encoded one by one as above.
   With ``upload="delta"`` a client encodes its update from the broadcast
   instead, plus its error-feedback residual (:mod:`fedquant.fl.updates`; the
   residuals are :attr:`RunState.residuals`, checkpointed with the model);
3. the server admits each payload (:mod:`fedquant.fl.ingest`), aggregates the
   admitted ones (:func:`fedquant.fl.aggregation.aggregate_payloads`) if at
   least ``min_clients`` arrived (adding aggregated deltas to its model), and
   evaluates every ``eval_every`` rounds.

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fedquant.errors import ConfigError
from fedquant.fl import adversary, seeding
from fedquant.fl.aggregation import AggregationRule, aggregate_payloads, parse_rule, relative_cap
from fedquant.fl.batched import state_to_numpy, train_batched, unsupported_reason
from fedquant.fl.client import (
    TrainConfig,
    TrainStats,
    encode_model,
    evaluate,
    load_numpy_state,
    state_numpy,
    train_local,
    upload_meta,
)
from fedquant.fl.config import RunConfig
from fedquant.fl.data import Dataset, TensorData, load_dataset, to_tensors
from fedquant.fl.ingest import Reference, admit
from fedquant.fl.models import build_model
from fedquant.fl.partition import label_counts, partition
from fedquant.fl.robust import byzantine_count
from fedquant.fl.seeding import Purpose
from fedquant.fl.updates import apply_delta, encode_delta, payload_delta_names
from fedquant.quant import codec
from fedquant.quant.codec import DecodedUpdate

log = logging.getLogger("fedquant.simulation")

#: metrics that are timings (they differ between otherwise identical runs)
TIMING_KEYS = ("seconds_train", "seconds_codec", "seconds_eval", "seconds_round")


def train_config(cfg: RunConfig) -> TrainConfig:
    """The clients' local-training settings of ``cfg`` (the simulator's and the Flower app's)."""
    return TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        qat=cfg.qat,
    )


def make_model(cfg: RunConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The configured model: a registered name or ``"package.module:factory"``."""
    if ":" in cfg.model:
        mod_name, _, attr = cfg.model.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError("model", f"cannot load {cfg.model!r}: {e}") from e
        model = factory(in_shape, num_classes)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                "model", f"{cfg.model!r} returned {type(model).__name__}, not a torch.nn.Module"
            )
        return model
    return build_model(cfg.model, in_shape, num_classes)


@dataclass
class RunState:
    """Everything that changes between rounds (what a checkpoint holds)."""

    round: int
    global_state: dict[str, np.ndarray]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    #: error feedback (``upload="delta"``): client id -> its residual per quantized tensor
    residuals: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


class Simulation:
    """A federated run of ``cfg`` in this process.

    Parameters
    ----------
    cfg : RunConfig
    dataset : Dataset, optional
        Use this data set instead of loading ``cfg.dataset``.
    model : torch.nn.Module, optional
        Use this (untrained) model instead of building ``cfg.model``; any
        module whose state dict the codec can carry works.
    """

    def __init__(
        self, cfg: RunConfig, *, dataset: Dataset | None = None, model: nn.Module | None = None
    ) -> None:
        self.cfg = cfg
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", "'cuda' was requested but torch sees no CUDA device")
        if cfg.device == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("device", "'mps' was requested but torch sees no MPS device")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        self.dataset = (
            dataset
            if dataset is not None
            else load_dataset(cfg.dataset, cfg.data_root, cfg.cache_dir)
        )
        self.data: TensorData = to_tensors(self.dataset)
        labels = self.dataset.train_y
        self.parts = partition(
            labels,
            cfg.num_clients,
            cfg.partition,
            alpha=cfg.alpha,
            shards_per_client=cfg.shards_per_client,
            seed=seeding.int_seed(cfg.seed, Purpose.PARTITION),
        )
        self.label_counts = label_counts(labels, self.parts, self.dataset.num_classes)
        # the train split in client order: a client's examples are a slice of it (a
        # view), not rows gathered again every round; ``data.train_x`` holds them so
        self._offsets = np.cumsum([0, *(p.size for p in self.parts)])
        order = torch.from_numpy(np.concatenate([*self.parts, np.zeros(0, np.int64)]))
        self.data = replace(
            self.data, train_x=self.data.train_x[order], train_y=self.data.train_y[order]
        )
        if model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seeding.int_seed(cfg.seed, Purpose.INIT))
                model = make_model(cfg, self.dataset.input_shape, self.dataset.num_classes)
        self.model = model.to(self.device)
        self.initial_state = state_numpy(self.model)
        self.reference = Reference.from_state(self.initial_state)
        self.uplink = cfg.uplink_spec()
        self.downlink = cfg.downlink_spec()
        self.rule = parse_rule(cfg.aggregation)
        self.train_cfg = train_config(cfg)
        self.hostile = self._hostile_clients()
        #: this round's trained (unquantized) models of the model-poisoning attackers
        self._trained_attackers: dict[int, dict[str, np.ndarray]] = {}
        #: why ``batched_clients`` could not be used (clients then train one after another)
        self.batched_fallback: str | None = None
        if cfg.batched_clients > 0:
            self.batched_fallback = unsupported_reason(
                self.model, self.train_cfg, self.data.train_x[:2]
            )
            if self.batched_fallback is not None:
                log.warning(
                    "batched_clients=%d: training clients one after another instead: %s",
                    cfg.batched_clients,
                    self.batched_fallback,
                )
        # validate the spec against the model now, not in round 1
        self.uplink.resolve(
            {k: (v.shape, v.dtype.kind == "f") for k, v in self.initial_state.items()}
        )

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

    def broadcast(self, state: RunState, round_: int) -> bytes:
        """The server's downlink payload for this round."""
        from fedquant.quant.spec import QuantSpec

        spec = self.downlink if self.downlink is not None else QuantSpec(default_bits=32)
        return codec.encode(
            state.global_state,
            spec,
            seed=seeding.seed_sequence(self.cfg.seed, Purpose.DOWNLINK, round_),
            meta={"round": round_},
        )

    @property
    def clients_at_once(self) -> int:
        """How many clients train at once (0: one after another, the loop)."""
        return self.cfg.batched_clients if self.batched_fallback is None else 0

    def _client_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = int(self._offsets[client]), int(self._offsets[client + 1])
        x, y = self.data.train_x[lo:hi], self.data.train_y[lo:hi]
        if self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def train_clients(
        self, clients: list[int], start: Mapping[str, np.ndarray], round_: int
    ) -> dict[int, tuple[dict[str, np.ndarray], TrainStats]]:
        """Train ``clients`` from ``start`` at once (:func:`~fedquant.fl.batched.train_batched`).

        Returns client id -> (trained state as NumPy arrays, its statistics), with
        the same mini-batches as :meth:`client_payload`'s one-by-one training.
        """
        load_numpy_state(self.model, start)
        res = train_batched(
            self.model,
            [self._client_data(c) for c in clients],
            self.train_cfg,
            generators=[
                seeding.torch_generator(self.cfg.seed, Purpose.SHUFFLE, round_, c) for c in clients
            ],
        )
        return {
            c: (state_to_numpy(st), stats)
            for c, st, stats in zip(clients, res.states, res.stats, strict=True)
        }

    def client_payload(
        self,
        client: int,
        start: Mapping[str, np.ndarray],
        round_: int,
        *,
        residuals: dict[int, dict[str, np.ndarray]] | None = None,
        trained: tuple[dict[str, np.ndarray], TrainStats] | None = None,
    ) -> tuple[bytes, float, float]:
        """Train client ``client`` from ``start``; returns (payload, train loss, train seconds).

        With ``upload="delta"`` the payload is the update from ``start``; with
        error feedback the client's entry of ``residuals`` is read and replaced.
        ``trained`` is the client's state and statistics if it was already trained
        (:meth:`train_clients`); then nothing is trained here and the seconds are 0.
        """
        cfg = self.cfg
        if trained is None:
            load_numpy_state(self.model, start)
            x, y = self._client_data(client)
            stats = train_local(
                self.model,
                x,
                y,
                self.train_cfg,
                generator=seeding.torch_generator(cfg.seed, Purpose.SHUFFLE, round_, client),
                qat_spec=self.uplink,
                qat_rng=seeding.numpy_rng(cfg.seed, Purpose.QAT, round_, client)
                if self.train_cfg.qat
                else None,
            )
            train_secs = stats.seconds
        else:  # the model carries the client's trained state from here on, as in the loop
            load_numpy_state(self.model, trained[0])
            stats, train_secs = trained[1], 0.0
        meta = upload_meta(
            round_,
            client,
            disclose_num_examples=stats.num_examples
            if self.rule is AggregationRule.FEDAVG
            else None,
        )
        if cfg.upload == "delta":
            up = encode_delta(
                state_numpy(self.model),
                start,
                self.uplink,
                seed=seeding.seed_sequence(cfg.seed, Purpose.UPLINK, round_, client),
                meta=meta,
                residual_in=None if residuals is None else residuals.get(client),
                error_feedback=cfg.error_feedback,
                shared_key=self._uplink_key(round_),
            )
            if cfg.error_feedback and residuals is not None:
                residuals[client] = up.residual
            return up.result.payload, stats.loss, train_secs
        enc = encode_model(
            self.model,
            self.uplink,
            seed=seeding.seed_sequence(cfg.seed, Purpose.UPLINK, round_, client),
            meta=meta,
            shared_key=self._uplink_key(round_),
        )
        return enc.payload, stats.loss, train_secs

    def _uplink_key(self, round_: int) -> int | None:
        """The round's rotation key for the uplink encoder (``None``: the spec does not rotate)."""
        return seeding.rotation_key(self.cfg.seed, round_) if self.uplink.rotation else None

    def replies(
        self,
        sent: list[tuple[int, bytes, float]],
        start: Mapping[str, np.ndarray],
        round_: int,
        shared_key: int | None = None,
    ) -> Iterator[tuple[int, str, bytes, float]]:
        """What reaches the server from the round's clients, ``(client, id, payload, loss)``:
        each honest payload of ``sent``, or a hostile client's corruption or poisoned model
        (``hostile_fraction`` / ``hostile_mode``, see :mod:`fedquant.fl.adversary`)."""
        honest: list[dict[str, np.ndarray]] | None = None
        for client, payload, loss in sent:
            mode = self.hostile.get(client)
            if mode is None:
                yield client, str(client), payload, loss
            elif mode == "duplicate":
                yield client, str(client), payload, loss
                yield client, str(client), payload, loss
            elif mode in adversary.ATTACKS:
                if mode in adversary.ROUND_ATTACKS and honest is None:  # the attackers collude
                    honest = [codec.decode(p, shared_key=shared_key).tensors for _, p, _ in sent]
                yield (
                    client,
                    str(client),
                    self._poisoned(client, payload, mode, start, round_, shared_key, honest, sent),
                    loss,
                )
            else:
                yield (
                    client,
                    str(client),
                    adversary.corrupt(payload, mode, shared_key=shared_key),
                    loss,
                )

    def _poisoned(
        self,
        client: int,
        payload: bytes,
        mode: str,
        start: Mapping[str, np.ndarray],
        round_: int,
        shared_key: int | None,
        honest: list[dict[str, np.ndarray]] | None,
        sent: list[tuple[int, bytes, float]],
    ) -> bytes:
        """An attacker's payload: its trained model (or update) poisoned, then encoded with the
        uplink spec as an honest client would (metadata from its honest payload)."""
        cfg = self.cfg
        dec = codec.inspect(payload, shared_key=shared_key)
        attackers = sum(self.hostile.get(c) == mode for c, _, _ in sent)
        deltas = (
            frozenset(payload_delta_names([dec.info])) if cfg.upload == "delta" else frozenset()
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

    def run_round(self, state: RunState) -> dict[str, Any]:
        """Run round ``state.round + 1``, update ``state`` in place, return its metrics."""
        cfg = self.cfg
        r = state.round + 1
        t_round = time.perf_counter()
        clients = self.sample_clients(r)
        fail_rng = seeding.numpy_rng(cfg.seed, Purpose.FAILURE, r)
        failed = (
            clients[fail_rng.random(clients.size) < cfg.failure_rate]
            if cfg.failure_rate > 0
            else clients[:0]
        )

        key = seeding.rotation_key(cfg.seed, r)  # the uplink rotation's shared key
        t0 = time.perf_counter()
        down = self.broadcast(state, r)
        start = state.global_state if self.downlink is None else codec.decode(down).tensors
        codec_s = time.perf_counter() - t0
        train_s = 0.0
        payloads: list[bytes] = []
        inspected: list[DecodedUpdate] = []
        admitted: list[int] = []
        rejected: dict[str, str] = {}
        losses, num_examples = [], []
        seen: set[str] = set()
        received = 0
        replies = 0
        k = self.clients_at_once
        todo = [int(c) for c in clients if c not in failed]  # who trains, in order
        trained: dict[int, tuple[dict[str, np.ndarray], TrainStats]] = {}
        sent: list[tuple[int, bytes, float]] = []  # (client, honest payload, train loss)
        for c in clients:
            if c in failed:
                continue
            if k and int(c) not in trained:  # train this client and the next k - 1 at once
                t0 = time.perf_counter()
                pos = todo.index(int(c))
                trained.update(self.train_clients(todo[pos : pos + k], start, r))
                train_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            payload, loss, secs = self.client_payload(
                int(c), start, r, residuals=state.residuals, trained=trained.pop(int(c), None)
            )
            train_s += secs
            if self.hostile.get(int(c)) in adversary.ATTACKS:  # poisons its trained model
                self._trained_attackers[int(c)] = state_numpy(self.model)
            sent.append((int(c), payload, loss))
            codec_s += time.perf_counter() - t0 - secs  # encode
        t1 = time.perf_counter()
        for c, cid, reply, loss in self.replies(sent, start, r, key):
            received += len(reply)
            replies += 1
            adm = admit(cid, reply, self.reference, seen=seen, kind=cfg.upload, shared_key=key)
            reason = adm.reason
            if adm.ok and self.rule is AggregationRule.FEDAVG:
                assert adm.update is not None
                n = adm.update.meta.get("num_examples")
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    reason = f"fedavg needs num_examples (an integer >= 0) in the payload metadata, got {n!r}"
                    log.warning("rejected update from client %s: %s", cid, reason)
            if reason:
                rejected[cid] = reason
                continue
            assert adm.update is not None
            payloads.append(reply)
            inspected.append(adm.update)
            admitted.append(int(c))
            losses.append(loss)
            if self.rule is AggregationRule.FEDAVG:
                num_examples.append(int(adm.update.meta["num_examples"]))
        codec_s += time.perf_counter() - t1  # admission (and any attack)

        row: dict[str, Any] = {
            "round": r,
            "clients_sampled": int(clients.size),
            "clients_failed": int(failed.size),
            "clients_rejected": len(rejected),
            "clients_aggregated": 0,
            "uplink_bytes": int(received),
            "downlink_bytes": int(len(down) * (clients.size - failed.size)),
            "uplink_float32_bytes": int(self.reference.float32_nbytes * replies),
            "train_loss": float(np.mean(losses)) if losses else math.nan,
        }
        if rejected:
            row["rejected"] = rejected
        t0 = time.perf_counter()
        if len(payloads) >= cfg.min_clients:
            agg = aggregate_payloads(
                payloads,
                self.rule,
                num_examples=num_examples if self.rule is AggregationRule.FEDAVG else None,
                max_weight=relative_cap(cfg.weight_cap, len(payloads)),
                mse_floor_rel=cfg.mse_floor,
                inspected=inspected,
                shared_key=key,
                reference=start,
                norm_bound=cfg.norm_bound,
                trim_fraction=cfg.trim_fraction,
                byzantine=byzantine_count(len(payloads), cfg.byzantine_fraction),
            )
            if agg.dropped:  # clients the norm bound left out of some tensor
                row["norm_outliers"] = len(agg.dropped)
            state.global_state = (
                apply_delta(state.global_state, agg.tensors, payload_delta_names(agg.infos))
                if cfg.upload == "delta"
                else agg.tensors
            )
            row["clients_aggregated"] = len(payloads)
            if self.uplink.bit_budget is not None:  # the widths the clients chose
                row["bits"] = {
                    name: float(np.mean([info[name].bits for info in agg.infos]))
                    for name in agg.infos[0]
                    if agg.infos[0][name].bits <= 8
                }
            row["mse"] = {
                name: float(np.mean([info[name].mse for info in agg.infos]))
                for name in agg.infos[0]
                if agg.infos[0][name].bits <= 8
            }
            row["max_weight_used"] = float(max(float(w.max()) for w in agg.weights.values()))
        else:
            row["skipped"] = f"{len(payloads)} valid replies < min_clients={cfg.min_clients}"
            log.warning("round %d: %s; global model unchanged", r, row["skipped"])
        codec_s += time.perf_counter() - t0
        row["uplink_ratio"] = (
            row["uplink_float32_bytes"] / row["uplink_bytes"] if row["uplink_bytes"] else math.nan
        )

        t0 = time.perf_counter()
        if r % cfg.eval_every == 0 or r == cfg.rounds:
            load_numpy_state(self.model, state.global_state)
            loss, acc = evaluate(self.model, self.data.test_x, self.data.test_y)
            row["test_loss"], row["test_accuracy"] = loss, acc
        eval_s = time.perf_counter() - t0
        prev = state.metrics[-1] if state.metrics else {}
        row["cum_uplink_bytes"] = prev.get("cum_uplink_bytes", 0) + row["uplink_bytes"]
        row["cum_downlink_bytes"] = prev.get("cum_downlink_bytes", 0) + row["downlink_bytes"]
        row["seconds_train"] = train_s
        row["seconds_codec"] = codec_s
        row["seconds_eval"] = eval_s
        row["seconds_round"] = time.perf_counter() - t_round
        state.round = r
        state.metrics.append(row)
        return row

    def run(
        self,
        state: RunState | None = None,
        *,
        on_round: Callable[[RunState, dict[str, Any]], None] | None = None,
    ) -> RunState:
        """Run the remaining rounds of ``state`` (a new run if ``None``)."""
        state = state if state is not None else self.new_state()
        while state.round < self.cfg.rounds:
            row = self.run_round(state)
            if on_round is not None:
                on_round(state, row)
        return state


def final_accuracy(metrics: list[dict[str, Any]]) -> float:
    """Test accuracy of the last evaluated round (NaN if none)."""
    for row in reversed(metrics):
        if "test_accuracy" in row:
            return float(row["test_accuracy"])
    return math.nan
