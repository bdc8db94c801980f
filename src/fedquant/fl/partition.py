"""Split a data set's samples among federated clients: IID, Dirichlet label skew, shards.

Three schemes, each a pure function of the labels and a seed:

* ``iid`` -- a seeded permutation cut into ``num_clients`` parts whose sizes
  differ by at most one.
* ``dirichlet`` -- the label-skew scheme of Hsu, Qi and Brown (2019),
  "Measuring the effects of non-identical data distribution for federated
  visual classification" (arXiv 1909.06335): for each class, proportions
  ``p ~ Dirichlet(alpha * 1)`` over the clients decide how that class's
  (shuffled) samples are dealt out. Small ``alpha`` gives each client few
  classes; large ``alpha`` approaches IID. Client sizes vary.
* ``shards`` -- the pathological non-IID split of McMahan et al. (2017),
  "Communication-efficient learning of deep networks from decentralized
  data": samples sorted by label are cut into ``num_clients *
  shards_per_client`` contiguous shards and each client receives
  ``shards_per_client`` of them at random, so a client sees at most about
  ``shards_per_client`` classes.

Every scheme returns a *disjoint cover*: each sample index appears in exactly
one client's array. Each array is ``int64`` and **sorted ascending** (a
client's loader shuffles its own samples each epoch). Only
``np.random.default_rng(seed)`` is used, never the global random state, so a
partition is reproducible from its arguments alone.

:func:`label_counts` and :func:`label_skew` describe the result. On 10
balanced classes of 1,000 samples and 20 clients (seed 0), the mean
total-variation distance :func:`label_skew` is 0.05 for ``iid``; 0.04, 0.11,
0.33, 0.45 and 0.71 for ``dirichlet`` with ``alpha`` = 100, 10, 1, 0.5 and
0.1; 0.58, 0.81 and 0.90 for ``shards`` with 5, 2 and 1 shards per client.
With ``alpha`` much below 0.1 most classes go to a single client, so fewer
than ``num_clients`` clients receive anything and ``min_size >= 1`` cannot be
met.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from fedquant.choices import StrChoice
from fedquant.errors import ConfigError

__all__ = ["SCHEMES", "Scheme", "label_counts", "label_skew", "partition"]


class Scheme(StrChoice):
    """How :func:`partition` splits the samples (see the module docstring)."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"


#: partition schemes accepted by :func:`partition`.
SCHEMES = tuple(s.value for s in Scheme)

#: Dirichlet draws tried before giving up on ``min_size``.
_MAX_DIRICHLET_DRAWS = 100


def _check_int(option: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(option, f"expected an integer, got {value!r} ({type(value).__name__})")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        allowed = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ConfigError(option, f"got {v}, expected an integer {allowed}")
    return v


def _check_labels(labels: object) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(
            "labels",
            f"expected a non-empty 1-d integer array, got dtype {arr.dtype}, shape {arr.shape}",
        )
    if arr.min() < 0:
        raise ConfigError("labels", f"labels must be >= 0, found {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def partition(
    labels: ArrayLike,
    num_clients: int,
    scheme: Scheme | str = Scheme.IID,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Assign every sample to exactly one of ``num_clients`` clients.

    Parameters
    ----------
    labels : array_like
        1-d non-negative integer labels, one per sample.
    num_clients : int
        Number of clients, ``1 <= num_clients <= len(labels)``.
    scheme : {"iid", "dirichlet", "shards"}, default "iid"
        See the module docstring.
    alpha : float, default 0.5
        Dirichlet concentration (``dirichlet`` only); finite and ``> 0``.
    shards_per_client : int, default 2
        Shards given to each client (``shards`` only);
        ``num_clients * shards_per_client <= len(labels)``.
    seed : int
        Seed of ``np.random.default_rng``; the same arguments always give the
        same partition.
    min_size : int, default 1
        Fewest samples any client may get. ``dirichlet`` re-draws (up to
        100 times, deterministically from ``seed``) until it holds; the other
        schemes check it.

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` sorted ``int64`` index arrays, pairwise disjoint, that
        together cover ``range(len(labels))``.

    Raises
    ------
    ConfigError
        If an argument is out of range, ``scheme`` is unknown, or no partition
        satisfying ``min_size`` is found.

    Examples
    --------
    >>> import numpy as np
    >>> parts = partition(np.zeros(10, dtype=np.int64), 3, seed=0)
    >>> [len(p) for p in parts], sorted(np.concatenate(parts).tolist()) == list(range(10))
    ([4, 3, 3], True)
    """
    y = _check_labels(labels)
    n = len(y)
    k = _check_int("num_clients", num_clients, 1, n)
    seed = _check_int("seed", seed, 0)
    min_size = _check_int("min_size", min_size, 0)
    if scheme not in SCHEMES:
        raise ConfigError(
            "scheme", f"unknown scheme {scheme!r}; expected one of: {', '.join(SCHEMES)}"
        )
    if min_size * k > n:
        raise ConfigError(
            "min_size", f"{k} clients x min_size {min_size} exceeds the {n} samples available"
        )
    rng = np.random.default_rng(seed)
    if scheme == Scheme.IID:
        parts = np.array_split(rng.permutation(n), k)
    elif scheme == Scheme.SHARDS:
        parts = _shards(y, k, shards_per_client, rng)
    else:
        parts = _dirichlet(y, k, alpha, min_size, rng)
    parts = [np.sort(p).astype(np.int64, copy=False) for p in parts]
    smallest = min(len(p) for p in parts)
    if smallest < min_size:
        raise ConfigError(
            "min_size",
            f"scheme {scheme!r} gives a client only {smallest} samples, fewer than min_size "
            f"{min_size}; use fewer clients or a smaller min_size",
        )
    return parts


def _shards(
    y: np.ndarray, k: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    s = _check_int("shards_per_client", shards_per_client, 1)
    n = len(y)
    if k * s > n:
        raise ConfigError(
            "shards_per_client",
            f"{k} clients x {s} shards = {k * s} shards, more than the {n} samples; "
            f"expected num_clients * shards_per_client <= {n}",
        )
    # shuffle first so the order inside a class depends on the seed, then sort by label
    perm = rng.permutation(n)
    order = perm[np.argsort(y[perm], kind="stable")]
    shards = np.array_split(order, k * s)
    owner = rng.permutation(k * s).reshape(k, s)
    return [np.concatenate([shards[j] for j in row]) for row in owner]


def _dirichlet(
    y: np.ndarray, k: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.number):
        raise ConfigError("alpha", f"expected a finite number > 0, got {alpha!r}")
    a = float(alpha)
    if not math.isfinite(a) or a <= 0:
        raise ConfigError("alpha", f"expected a finite number > 0, got {a}")
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    smallest = 0
    for _ in range(_MAX_DIRICHLET_DRAWS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(k, a))
            if not np.all(
                np.isfinite(p)
            ):  # possible underflow at tiny alpha: give it to one client
                p = np.eye(k)[rng.integers(k)]
            cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for client, piece in enumerate(np.split(idx, cuts)):
                buckets[client].append(piece)
        parts = [np.concatenate(b) for b in buckets]
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return parts
    raise ConfigError(
        "min_size",
        f"{_MAX_DIRICHLET_DRAWS} Dirichlet(alpha={a}) draws for {k} clients all left a client with "
        f"fewer than min_size={min_size} samples (last draw: {smallest}); raise alpha, lower "
        f"min_size or use fewer clients",
    )


def label_counts(labels: ArrayLike, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-client class histogram.

    Parameters
    ----------
    labels : array_like
        1-d non-negative integer labels.
    parts : sequence of numpy.ndarray
        Index arrays, e.g. from :func:`partition`.
    num_classes : int
        Number of classes; every label must be below it.

    Returns
    -------
    numpy.ndarray
        ``int64`` array ``(len(parts), num_classes)``; entry ``[i, c]`` counts
        the samples of class ``c`` held by client ``i``.

    Raises
    ------
    ConfigError
        If a label is ``>= num_classes`` or the labels are not 1-d integers.
    """
    y = _check_labels(labels)
    c = _check_int("num_classes", num_classes, 1)
    if y.max() >= c:
        raise ConfigError("num_classes", f"got {c}, but a label is {int(y.max())}")
    out = np.zeros((len(parts), c), dtype=np.int64)
    for i, p in enumerate(parts):
        out[i] = np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=c)
    return out


def label_skew(
    labels: ArrayLike, parts: Sequence[np.ndarray], num_classes: int | None = None
) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    ``TV_i = 0.5 * sum_c |p_i(c) - p(c)|`` where ``p_i`` is client ``i``'s
    class distribution and ``p`` that of all samples in ``parts``; the result
    is the unweighted mean over clients that hold at least one sample. It is
    0 when every client mirrors the global mix and approaches 1 when each
    client holds a single class of many.

    Parameters
    ----------
    labels, parts
        As :func:`label_counts`.
    num_classes : int, optional
        Default ``labels.max() + 1``.

    Returns
    -------
    float
        A value in ``[0, 1]``.
    """
    y = _check_labels(labels)
    counts = label_counts(y, parts, int(y.max()) + 1 if num_classes is None else num_classes)
    sizes = counts.sum(axis=1)
    held = counts[sizes > 0]
    if len(held) == 0:
        raise ConfigError("parts", "no client holds any sample")
    global_p = held.sum(axis=0) / held.sum()
    client_p = held / held.sum(axis=1, keepdims=True)
    return float(np.mean(0.5 * np.abs(client_p - global_p).sum(axis=1)))
