"""What a federated workload is: the :class:`Task` protocol and the :class:`FederatedData` container.

A :class:`Task` says how a mini-batch gives a loss (:attr:`Task.loss`) and how
a model is evaluated on a data set (:attr:`Task.evaluate`); optionally it
replaces the whole local training loop (:attr:`Task.train`). The simulator
(:class:`fedquant.fl.simulation.Simulation`) runs any task; the default,
:func:`image_classification_task`, is the paper's image classifier
(cross-entropy, accuracy).

:class:`FederatedData` holds the clients' training sets and the server's test
set as :class:`torch.utils.data.Dataset` objects, either partitioned from one
training set (:func:`federate`: by labels where the data set has them, IID
otherwise) or given as a *natural* partition (one data set per client: a
writer, a speaker, a file).

Batches
-------
A client's data set is read in mini-batches of ``batch_size`` samples in an
order drawn from the client's seeded generator (``torch.randperm``). A
:class:`torch.utils.data.TensorDataset` is indexed directly (one gather per
tensor); any other data set is read sample by sample and combined with
:attr:`Task.collate` (default :func:`torch.utils.data.default_collate`). The
batch reaches :attr:`Task.loss` already on the training device (tensors inside
tuples, lists and dicts are moved).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from fedquant.errors import DataError
from fedquant.fl.train_config import CLIENT_OPTIMIZERS, ClientOptimizer, TrainConfig

__all__ = [
    "CLIENT_OPTIMIZERS",
    "ClientOptimizer",
    "FederatedData",
    "Task",
    "TrainConfig",
    "TrainStats",
    "as_dataset",
    "cross_entropy_scores",
    "dataset_labels",
    "evaluate",
    "evaluate_classification",
    "federate",
    "image_classification_task",
    "iter_batches",
    "to_device",
]


@dataclass(frozen=True)
class TrainStats:
    """What a client's local training reports."""

    loss: (
        float  # mean training loss (the task's loss, without the proximal term) over the last epoch
    )
    num_examples: int
    seconds: float


LossFn = Callable[[nn.Module, Any], torch.Tensor]
EvaluateFn = Callable[[nn.Module, Dataset, torch.device], dict[str, float]]
TrainFn = Callable[[nn.Module, Dataset, TrainConfig, torch.Generator], TrainStats]


@dataclass(frozen=True)
class Task:
    """What a federated workload is: how a batch gives a loss, how a model is evaluated.

    Attributes
    ----------
    name : str
    loss : callable
        ``loss(model, batch) -> scalar tensor``: the mean loss of a mini-batch,
        ``batch`` as the collate function yields it, already on the device.
        The generic loop (:func:`fedquant.fl.client.train_local`) backpropagates it.
    evaluate : callable
        ``evaluate(model, dataset, device) -> {"metric": value, ...}`` (plain
        floats). The simulator records each as ``test_<metric>`` per round.
    metric : str
        The headline key of :attr:`evaluate`'s result (progress bar, summary, plots).
    higher_is_better : bool
        Whether a larger :attr:`metric` is better (accuracy) or worse (a loss).
    train : callable, optional
        ``train(model, dataset, config, generator) -> TrainStats``: replaces the
        generic loop entirely (the model holds the received global weights on
        entry and must hold the trained ones on return; ``config.lr`` is this
        round's rate; ``generator`` is the client's seeded stream for this round;
        ``qat`` and ``prox_mu`` are then the function's business).
    collate : callable, optional
        Combines a list of samples into a batch for data sets that are not a
        :class:`~torch.utils.data.TensorDataset` (default
        :func:`torch.utils.data.default_collate`).
    """

    name: str
    loss: LossFn
    evaluate: EvaluateFn
    metric: str = "accuracy"
    higher_is_better: bool = True
    train: TrainFn | None = None
    collate: Callable[[list[Any]], Any] | None = None


# ---------------------------------------------------------------------- batches


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (inside tuples, lists and dicts too) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple):
        return tuple(to_device(b, device) for b in batch)
    if isinstance(batch, list):
        return [to_device(b, device) for b in batch]
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_reader(
    data: Dataset, device: torch.device, collate: Callable[[list[Any]], Any] | None = None
) -> Callable[[torch.Tensor], Any]:
    """A function from sample indices to a batch on ``device`` (see the module docstring)."""
    if isinstance(data, TensorDataset) and collate is None:
        tensors = data.tensors
        return lambda idx: tuple(t[idx].to(device, non_blocking=True) for t in tensors)
    combine = collate if collate is not None else default_collate
    return lambda idx: to_device(combine([data[i] for i in idx.tolist()]), device)


def iter_batches(
    data: Dataset,
    batch_size: int,
    device: torch.device,
    *,
    generator: torch.Generator | None = None,
    collate: Callable[[list[Any]], Any] | None = None,
    drop_single: bool = False,
) -> Iterator[tuple[int, Any]]:
    """``(batch size, batch)`` over ``data``: shuffled by ``generator``, or in order without it.

    ``drop_single`` skips every batch of one sample (BatchNorm cannot train on
    one sample): the last batch when ``len(data) % batch_size == 1``, and the
    only batch of a one-sample data set.
    """
    n = len(data)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    read = batch_reader(data, device, collate)
    for b in range(0, n, batch_size):
        idx = order[b : b + batch_size]
        if drop_single and idx.numel() < 2:
            continue
        yield idx.numel(), read(idx)


# ---------------------------------------------------------------------- data


def as_dataset(obj: Any, what: str = "data") -> Dataset:
    """A :class:`~torch.utils.data.Dataset` from a data set, a tensor, or a tuple of tensors.

    Tensors are taken as they are (any dtype: no normalization is applied).
    """
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, torch.Tensor):
        return TensorDataset(obj)
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        n = {int(t.shape[0]) for t in obj}
        if len(n) != 1:
            raise DataError(
                f"{what}: the tensors have different first dimensions {sorted(n)}; "
                "expected one sample per row in each"
            )
        return TensorDataset(*obj)
    raise DataError(
        f"{what}: expected a torch.utils.data.Dataset, a tensor or a tuple of tensors, "
        f"got {type(obj).__name__}"
    )


def dataset_labels(data: Dataset) -> np.ndarray | None:
    """The integer class labels of ``data`` if it has them, else ``None``.

    Read from a ``targets`` attribute (torchvision data sets) or, for a
    :class:`~torch.utils.data.TensorDataset` of two or more tensors, from its
    last tensor when that is 1-d and of an integer dtype.
    """
    raw: Any = getattr(data, "targets", None)
    if raw is None and isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        raw = data.tensors[-1]
    if raw is None:
        return None
    arr = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.size != len(data):  # type: ignore[arg-type]
        return None
    if arr.size and arr.min() < 0:
        return None
    return arr.astype(np.int64, copy=False)


def _infer_shape(data: Dataset) -> tuple[int, ...] | None:
    """The shape of one input (the first element of the first sample), if it is a tensor."""
    if isinstance(data, TensorDataset):
        return tuple(data.tensors[0].shape[1:])
    try:
        sample = data[0]
    except Exception:  # a foreign data set: nothing to infer
        return None
    x = sample[0] if isinstance(sample, (tuple, list)) and sample else sample
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


@dataclass(frozen=True, eq=False)
class FederatedData:
    """The clients' training sets and the server's test set.

    Attributes
    ----------
    clients : list of Dataset
        One training set per client (client ``i`` is ``clients[i]``).
    test : Dataset
        The server's test set (:attr:`Task.evaluate` runs on it).
    name : str
        A name for the results directory and its ``meta.json``.
    num_classes : int, optional
        Number of classes, for the label counts in ``clients.json`` and for
        building a registered model (``cfg.model``).
    input_shape : tuple of int, optional
        Shape of one input sample (for building a registered model); inferred
        from the first client's first sample when not given.
    labels : list of numpy.ndarray, optional
        Each client's class labels (for ``clients.json``); read from the data
        sets when they carry labels (:func:`dataset_labels`).
    meta : mapping, optional
        JSON-ready facts about the data (e.g. a corpus's SHA-256) that the
        simulator adds to the ``dataset`` entry of ``meta.json``.
    """

    clients: Sequence[Dataset]
    test: Dataset
    name: str = "custom"
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    labels: Sequence[np.ndarray] | None = field(default=None)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clients = [as_dataset(c, f"client {i}'s data") for i, c in enumerate(self.clients)]
        if not clients:
            raise DataError("federated data: expected at least one client data set, got none")
        for i, c in enumerate(clients):
            if len(c) == 0:  # type: ignore[arg-type]
                raise DataError(f"federated data: client {i} has no samples")
        object.__setattr__(self, "clients", clients)
        object.__setattr__(self, "test", as_dataset(self.test, "test data"))
        if self.labels is None:
            found = [dataset_labels(c) for c in clients]
            if all(lab is not None for lab in found):
                object.__setattr__(self, "labels", found)
        elif len(self.labels) != len(clients):
            raise DataError(
                f"federated data: {len(self.labels)} label arrays for {len(clients)} clients"
            )
        if self.num_classes is None and self.labels is not None:
            top = max((int(lab.max()) for lab in self.labels if lab.size), default=-1)
            test_labels = dataset_labels(self.test)
            if test_labels is not None and test_labels.size:
                top = max(top, int(test_labels.max()))
            object.__setattr__(self, "num_classes", top + 1 if top >= 0 else None)
        if self.input_shape is None:
            object.__setattr__(self, "input_shape", _infer_shape(clients[0]))

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def sizes(self) -> list[int]:
        """Number of training samples per client."""
        return [len(c) for c in self.clients]  # type: ignore[arg-type]

    def label_counts(self) -> np.ndarray | None:
        """``(clients, classes)`` label counts, or ``None`` without labels."""
        if self.labels is None or self.num_classes is None:
            return None
        return np.stack(
            [
                np.bincount(lab, minlength=self.num_classes)[: self.num_classes]
                for lab in self.labels
            ]
        )


def federate(
    train: Any,
    test: Any,
    *,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int,
    labels: Any = None,
    name: str = "custom",
) -> FederatedData:
    """Split one training set among ``num_clients`` clients.

    Parameters
    ----------
    train, test : Dataset, tensor or tuple of tensors
        See :func:`as_dataset`.
    num_clients : int
    scheme : {"iid", "dirichlet", "shards"}
        Applied to the labels (``labels``, or :func:`dataset_labels` of
        ``train``); a data set without labels can only be split ``iid``.
    alpha, shards_per_client, seed
        As :func:`fedquant.fl.partition.partition`.
    labels : array_like, optional
        One integer label per training sample.
    name : str
    """
    from torch.utils.data import Subset

    from fedquant.errors import ConfigError
    from fedquant.fl.partition import partition

    train_ds = as_dataset(train, "training data")
    n = len(train_ds)  # type: ignore[arg-type]
    lab = dataset_labels(train_ds) if labels is None else np.asarray(labels)
    if lab is None:
        if scheme != "iid":
            raise ConfigError(
                "partition",
                f"{scheme!r} splits by class label, but the training data has none; "
                "expected 'iid' or labels=",
            )
        key = np.zeros(n, dtype=np.int64)  # the iid split only shuffles
    else:
        if lab.shape != (n,):
            raise DataError(f"labels: expected {n} labels (one per sample), got shape {lab.shape}")
        key = lab
    parts = partition(
        key, num_clients, scheme, alpha=alpha, shards_per_client=shards_per_client, seed=seed
    )
    if isinstance(train_ds, TensorDataset):  # tensor slices stay tensors (the fast path)
        clients: list[Dataset] = [
            TensorDataset(*(t[torch.from_numpy(p)] for t in train_ds.tensors)) for p in parts
        ]
    else:
        clients = [Subset(train_ds, p.tolist()) for p in parts]
    return FederatedData(
        clients=clients,
        test=as_dataset(test, "test data"),
        name=name,
        labels=None if lab is None else [key[p] for p in parts],
    )


# ---------------------------------------------------------------------- the default task


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``(x, y)``.

    Batches of 250 keep activations under glibc's 32 MB mmap threshold: larger
    batches made evaluation ~1.7x slower here (fresh page faults per batch).
    """
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for b in range(0, int(x.shape[0]), batch_size):
        xb, yb = x[b : b + batch_size].to(device), y[b : b + batch_size].to(device)
        out = model(xb)
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    n = max(int(x.shape[0]), 1)
    return loss_sum / n, correct / n


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    data: Dataset,
    device: torch.device,
    *,
    collate: Callable[[list[Any]], Any] | None = None,
) -> dict[str, float]:
    """``{"loss": mean cross-entropy, "accuracy": ...}`` of ``model`` on ``(input, label)`` samples."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2 and collate is None:
        loss, acc = evaluate(model, data.tensors[0], data.tensors[1])
        return {"loss": loss, "accuracy": acc}
    return cross_entropy_scores(
        model, (b for _, b in iter_batches(data, 250, device, collate=collate))
    )


@torch.no_grad()
def cross_entropy_scores(model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """``{"loss": mean cross-entropy, "accuracy": ...}`` of ``model`` over ``(input, target)``
    batches, every target counted once (a sequence model's logits ``(..., classes)`` are
    scored position by position)."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        logits, target = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
        n += target.numel()
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1)}


def _cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def image_classification_task() -> Task:
    """The default task: ``(input, label)`` batches, cross-entropy loss, accuracy."""
    return Task(
        name="classification",
        loss=_cross_entropy,
        evaluate=evaluate_classification,
        metric="accuracy",
        higher_is_better=True,
    )
