"""Federated next-character prediction: the text workloads and their :class:`~fedquant.fl.task.Task`.

``fedquant run --dataset python-stdlib-text --model char-transformer`` trains
:class:`~fedquant.fl.models_text.CharTransformer` on the Python standard
library's own sources, one client per top-level package
(:mod:`fedquant.fl.data.text`); ``--dataset text --data-root DIR`` on a folder
of text files (``--num-clients`` must then equal the folder's number of
clients).

The task
--------
loss
    Mean cross-entropy of the next byte over every position of a window
    (nats per character).
evaluate
    On the test windows: ``loss``, ``accuracy`` (the share of positions whose
    most likely next byte is the true one) and ``bits_per_char``
    (``loss / ln 2``), the headline metric (lower is better).

Examples
--------
The windows (see :func:`load_text_workload`): :data:`CONTEXT` bytes of
context; each client draws :data:`TRAIN_WINDOWS` training windows (fewer for a
small client) at random offsets of its training text, seeded by
``(seed, client)`` (:class:`~fedquant.fl.seeding.Purpose.PARTITION`), fixed for
the whole run; the test set is up to :data:`TEST_WINDOWS` non-overlapping
windows of all clients' held-out tails.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedquant.errors import ConfigError
from fedquant.fl import seeding
from fedquant.fl.config import RunConfig
from fedquant.fl.data.text import (
    VOCAB_SIZE,
    TextCorpus,
    load_stdlib_corpus,
    load_text_folder,
    text_windows,
)
from fedquant.fl.names import FOLDER_NAME, STDLIB_NAME, TEXT_DATASETS
from fedquant.fl.seeding import Purpose
from fedquant.fl.task import FederatedData, Task, cross_entropy_scores, iter_batches

#: bytes of context per example
CONTEXT = 32
#: training windows per client (at most)
TRAIN_WINDOWS = 128
#: test windows in all (at most)
TEST_WINDOWS = 256
#: windows per evaluation batch
EVAL_BATCH = 64


def next_byte_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean cross-entropy (nats) of ``model``'s next-byte logits over a batch of windows."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate_next_byte(model: nn.Module, data: Dataset, device: torch.device) -> dict[str, float]:
    """``loss`` (nats per character), ``accuracy`` and ``bits_per_char`` of ``model`` on ``data``.

    Every position of every window counts once; ``bits_per_char`` is ``loss / ln 2``.
    """
    scores = cross_entropy_scores(model, (b for _, b in iter_batches(data, EVAL_BATCH, device)))
    return {**scores, "bits_per_char": scores["loss"] / math.log(2)}


def next_byte_task() -> Task:
    """The next-character task: cross-entropy loss; bits per character as the headline."""
    return Task(
        name="next-byte",
        loss=next_byte_loss,
        evaluate=evaluate_next_byte,
        metric="bits_per_char",
        higher_is_better=False,
    )


def load_corpus(name: str, root: str | None) -> TextCorpus:
    """The corpus of a text data set name (``root``: the folder; optional for the built-in one)."""
    if name == STDLIB_NAME:
        return load_stdlib_corpus(root)
    if name == FOLDER_NAME:
        return load_text_folder(root)
    raise ConfigError(
        "dataset", f"{name!r} is not a text data set; expected one of: {', '.join(TEXT_DATASETS)}"
    )


def federated_text(
    corpus: TextCorpus,
    seed: int,
    *,
    context: int = CONTEXT,
    train_windows: int = TRAIN_WINDOWS,
    test_windows: int = TEST_WINDOWS,
) -> FederatedData:
    """``corpus`` as a natural partition: client ``k``'s windows, the shared test windows.

    The returned data carry ``input_shape=(context,)`` and ``num_classes=256``
    (the byte vocabulary), which a registered model such as ``char-transformer``
    is built from.
    """
    splits = text_windows(
        corpus,
        context=context,
        train_windows=train_windows,
        test_windows=test_windows,
        rng_for_client=lambda k: seeding.numpy_rng(seed, Purpose.PARTITION, 0, k),
    )
    return FederatedData(
        clients=[TensorDataset(w.x, w.y) for w in splits.clients],
        test=TensorDataset(splits.test.x, splits.test.y),
        name=corpus.name,
        num_classes=VOCAB_SIZE,
        input_shape=(context,),
        meta={
            "corpus": corpus.describe(),
            "context": context,
            "train_windows_per_client": train_windows,
            "test_windows": len(splits.test),
        },
    )


def load_text_workload(cfg: RunConfig) -> tuple[FederatedData, Task]:
    """The workload of ``cfg.dataset`` (one of :data:`TEXT_DATASETS`): data and task."""
    corpus = load_corpus(cfg.dataset, cfg.data_root)
    return federated_text(corpus, cfg.seed), next_byte_task()
