"""The :class:`Dataset` container and the class names of the built-in data sets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from fedquant.errors import DataError

StrPath: TypeAlias = "str | os.PathLike[str]"

MNIST_CLASSES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image data set, split into train and test parts.

    Parameters
    ----------
    name : str
        The data set's name, e.g. ``"fashion-mnist"``.
    train_x, test_x : numpy.ndarray
        ``uint8`` images of shape ``(N, H, W, C)`` (NHWC; ``C = 1`` for grey).
        Both splits have the same ``H, W, C``.
    train_y, test_y : numpy.ndarray
        ``int64`` labels of shape ``(N,)``, each in ``[0, len(classes))``.
    classes : tuple of str
        Class names; label ``k`` is ``classes[k]``.

    Raises
    ------
    DataError
        If a shape, dtype or label is inconsistent.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        classes = tuple(self.classes)
        object.__setattr__(self, "classes", classes)
        where = f"data set {self.name!r}"
        if not classes or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{where}: classes must be a non-empty tuple of str, got {classes!r}")
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(
                    f"{where}: {split}_x must be a uint8 array of shape (N, H, W, C), got "
                    f"{_describe(x)}"
                )
            if min(x.shape) < 1:
                raise DataError(f"{where}: {split}_x has an empty dimension: shape {x.shape}")
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != x.shape[:1]:
                raise DataError(
                    f"{where}: {split}_y must be an int64 array of shape ({len(x)},), got "
                    f"{_describe(y)}"
                )
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= len(classes):
                raise DataError(
                    f"{where}: {split}_y holds labels in [{lo}, {hi}], expected [0, {len(classes) - 1}] "
                    f"for {len(classes)} classes"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(
                f"{where}: train images are {self.train_x.shape[1:]} (H, W, C) but test images are "
                f"{self.test_x.shape[1:]}"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image as a model sees it (channels first)."""
        _, h, w, c = self.train_x.shape
        return (c, h, w)


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"dtype {a.dtype}, shape {a.shape}"
    return type(a).__name__
