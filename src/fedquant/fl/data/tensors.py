"""Conversion of a :class:`Dataset` to normalized float32 NCHW torch tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedquant.fl.data.dataset import Dataset


@dataclass(frozen=True, eq=False)
class TensorData:
    """A data set as torch tensors ready for a model.

    Attributes
    ----------
    train_x, test_x : torch.Tensor
        ``float32`` images ``(N, C, H, W)``: pixels scaled to ``[0, 1]``, then
        (if normalized) ``(x - mean[c]) / std[c]`` per channel.
    train_y, test_y : torch.Tensor
        ``int64`` labels ``(N,)``.
    mean, std : tuple of float
        Per-channel mean and standard deviation of the *train* split's scaled
        pixels (population std; a constant channel gets std 1). They are
        ``(0.0, ...)`` and ``(1.0, ...)`` when not normalized.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and std of ``x / 255`` from a 256-bin histogram per channel."""
    c = x.shape[-1]
    flat = x.reshape(-1, c)
    hist = np.zeros((c, 256), dtype=np.int64)
    step = 1 << 20  # bounded temporaries: bincount casts its input to intp
    for start in range(0, len(flat), step):
        chunk = flat[start : start + step]
        for ch in range(c):
            hist[ch] += np.bincount(chunk[:, ch], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = hist.sum(axis=1)
    mean = hist @ values / n
    var = hist @ (values**2) / n - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    std[std == 0] = 1.0
    return mean, std


def _to_nchw(x: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> torch.Tensor:
    """``x / 255`` as float32 NCHW, then ``(. - mean) / std`` fused as one multiply-add per channel."""
    n, h, w, c = x.shape
    out = torch.empty((n, c, h, w), dtype=torch.float32)
    out.copy_(torch.from_numpy(x).permute(0, 3, 1, 2))  # uint8 -> float32, NHWC -> NCHW
    if mean is None or std is None:
        return out.div_(255.0)  # exactly x / 255 in float32
    scale = torch.from_numpy(1.0 / (255.0 * std)).float().view(1, c, 1, 1)
    shift = torch.from_numpy(-mean / std).float().view(1, c, 1, 1)
    return out.mul_(scale).add_(shift)


def to_tensors(dataset: Dataset, *, normalize: bool = True) -> TensorData:
    """Convert a :class:`Dataset` to float32 NCHW tensors, normalized with train statistics.

    Parameters
    ----------
    dataset : Dataset
        The data set.
    normalize : bool, default True
        If False, pixels are only scaled to ``[0, 1]``.

    Returns
    -------
    TensorData
        The tensors and the mean/std used (computed on the train split and
        applied to both splits).
    """
    c = dataset.train_x.shape[-1]
    mean, std = _channel_stats(dataset.train_x) if normalize else (None, None)
    return TensorData(
        train_x=_to_nchw(dataset.train_x, mean, std),
        train_y=torch.from_numpy(np.ascontiguousarray(dataset.train_y, dtype=np.int64)).clone(),
        test_x=_to_nchw(dataset.test_x, mean, std),
        test_y=torch.from_numpy(np.ascontiguousarray(dataset.test_y, dtype=np.int64)).clone(),
        mean=tuple(float(m) for m in mean) if mean is not None else (0.0,) * c,
        std=tuple(float(s) for s in std) if std is not None else (1.0,) * c,
    )
