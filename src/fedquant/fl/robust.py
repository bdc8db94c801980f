"""Robust aggregation: the math that keeps a few bad client models from wrecking the global one.

Pure functions on NumPy arrays, used by
:func:`fedquant.fl.aggregation.aggregate_payloads` (and through it by the
simulator, the library and the Flower strategy). Everything works on the
*dequantized* tensors, so it composes with any quantization spec.

Norm bound (after Sun et al., 2019, "Can you really backdoor federated learning?")
    A client's update of tensor ``l`` is ``u_lj = x_lj - g_l`` (its tensor
    minus the global model it started from; for the delta tensors of
    ``upload="delta"`` payloads, the tensor itself). A client whose update of
    a floating tensor is longer than ``factor`` times the median client's
    norm for that tensor is an outlier there (:func:`outliers`), and its
    update of that tensor is left out: the weight rules give it weight 0 on
    that tensor (the others' weights renormalized), the robust rules see the
    global model's value instead (a zero update). ``factor`` is generous, so
    that honest clients are not outliers and honest results are unchanged
    (with very small non-IID clients, honest BatchNorm statistics can exceed
    it: ``docs/robustness.md``).

    Why leave out instead of scaling down to the bound (Sun et al.'s
    clipping)? A third of the clients, each pushing ``factor`` times a
    typical update in one direction (the model x 1e6 pushes every tensor
    along itself), outweigh the honest ones on every tensor whose honest
    updates are small or disagree (BatchNorm scales and running statistics),
    and the evaluated model collapses although no weight is large. Bounding
    per tensor, not over the whole model, keeps an attacker from hiding a
    large change of one small tensor in the norm of the large ones. An adaptive attacker can stay just under
    ``factor`` times the median; that is what the robust rules below are for.
    Needs at least 3 clients (with 2, neither can exceed ``factor >= 2`` times
    their median).

Coordinate-wise median and trimmed mean (Yin et al., ICML 2018)
    :func:`coordinate_median`, :func:`trimmed_mean`: per coordinate, the
    median of the clients' values, or the mean after dropping the ``k``
    largest and ``k`` smallest.

Krum and multi-Krum (Blanchard et al., NeurIPS 2017)
    :func:`krum_scores`: client ``i``'s score is the sum of squared distances
    to its ``m - f - 2`` nearest other clients (``f`` assumed Byzantine);
    Krum keeps the client with the lowest score, multi-Krum averages the
    ``k`` lowest (:func:`krum_select`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedquant.errors import InvalidInputError

__all__ = [
    "BYZANTINE_FRACTION",
    "NORM_BOUND",
    "TRIM_FRACTION",
    "byzantine_count",
    "coordinate_median",
    "drop_updates",
    "krum_scores",
    "krum_select",
    "outliers",
    "tensor_update_norms",
    "trim_count",
    "trimmed_mean",
]

#: default norm bound: a client's update of a tensor longer than this many times the
#: median client's norm is left out of that tensor's aggregate (0 switches the bound off)
NORM_BOUND = 5.0
#: default fraction of clients trimmed from *each* end by ``trimmed-mean``
TRIM_FRACTION = 0.3
#: default fraction of clients Krum assumes Byzantine (``f = floor(fraction * m)``)
BYZANTINE_FRACTION = 0.3


def tensor_update_norms(
    tensors: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    names: Sequence[str],
    deltas: frozenset[str] | set[str] = frozenset(),
) -> np.ndarray:
    """L2 norm of one client's update of each tensor in ``names`` (float64).

    The update is ``tensors[n] - reference[n]``, or ``tensors[n]`` itself for
    ``n`` in ``deltas`` (tensors that already travel as updates).
    """
    out = np.empty(len(names), dtype=np.float64)
    for i, n in enumerate(names):
        x = np.asarray(tensors[n], dtype=np.float64)
        u = x if n in deltas else x - np.asarray(reference[n], dtype=np.float64)
        out[i] = float(np.sqrt(np.dot(u.reshape(-1), u.reshape(-1))))
    return out


def outliers(norms: np.ndarray, factor: float) -> np.ndarray:
    """Which client updates exceed ``factor`` times the median client's norm, per tensor.

    Parameters
    ----------
    norms : ndarray of shape (m, T)
        Client ``j``'s update norm of tensor ``t`` (:func:`tensor_update_norms`).
    factor : float
        The threshold relative to each tensor's median client norm: 0 means no
        bound (nothing is an outlier), otherwise at least 1 (so that the
        clients at or below the median never are).

    Returns
    -------
    ndarray of bool, shape (m, T)
        ``norms[j, t] > factor * median_j(norms[:, t])``.
    """
    n = np.asarray(norms, dtype=np.float64)
    if n.ndim != 2:
        raise InvalidInputError(f"norm bound: norms must be (clients, tensors), got {n.shape}")
    if np.isnan(n).any() or (n < 0).any():
        raise InvalidInputError("norm bound: norms must be >= 0")
    if not (factor == 0 or factor >= 1) or not np.isfinite(factor):
        raise InvalidInputError(f"norm bound: factor {factor!r} must be 0 (off) or >= 1")
    if factor == 0 or n.size == 0:
        return np.zeros(n.shape, dtype=bool)
    return n > factor * np.median(n, axis=0)[None, :]


def drop_updates(
    tensors: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    names: Sequence[str],
    deltas: frozenset[str] | set[str] = frozenset(),
) -> dict[str, np.ndarray]:
    """One client's tensors with its update of each tensor in ``names`` set to zero.

    The reference's value (in the tensor's dtype), or zeros for ``deltas``;
    the other tensors are returned as they are (the same array objects).
    """
    out = dict(tensors)
    for n in names:
        x = np.asarray(tensors[n])
        out[n] = (
            np.zeros_like(x) if n in deltas else np.asarray(reference[n]).astype(x.dtype, copy=True)
        )
    return out


def coordinate_median(stack: np.ndarray) -> np.ndarray:
    """The median over axis 0 (clients), coordinate by coordinate, in float64."""
    s = np.asarray(stack, dtype=np.float64)
    if s.shape[0] == 0:
        raise InvalidInputError("median: no client updates")
    return np.median(s, axis=0)


def trim_count(m: int, fraction: float) -> int:
    """How many clients ``trimmed-mean`` drops from each end: ``floor(fraction * m)``,
    lowered so that at least one client remains."""
    if not 0.0 <= fraction < 0.5:
        raise InvalidInputError(f"trimmed-mean: trim fraction {fraction!r} must be in [0, 0.5)")
    return min(int(np.floor(fraction * m)), (m - 1) // 2)


def trimmed_mean(stack: np.ndarray, k: int) -> np.ndarray:
    """The mean over axis 0 of the values left after dropping the ``k`` smallest and ``k``
    largest of every coordinate (float64)."""
    s = np.asarray(stack, dtype=np.float64)
    m = s.shape[0]
    if m == 0:
        raise InvalidInputError("trimmed-mean: no client updates")
    if k < 0 or 2 * k >= m:
        raise InvalidInputError(f"trimmed-mean: cannot drop {k} from each end of {m} clients")
    if k == 0:
        return s.mean(axis=0)
    return np.sort(s, axis=0)[k : m - k].mean(axis=0)


def byzantine_count(m: int, fraction: float) -> int:
    """Krum's ``f`` for ``m`` clients: ``floor(fraction * m)``, lowered to the largest ``f``
    with ``2 f + 2 < m`` (Krum's condition; 0 when ``m <= 3``)."""
    if not 0.0 <= fraction < 0.5:
        raise InvalidInputError(f"krum: Byzantine fraction {fraction!r} must be in [0, 0.5)")
    return max(0, min(int(np.floor(fraction * m)), (m - 3) // 2))


def krum_scores(flat: np.ndarray, f: int) -> np.ndarray:
    """Krum's score of each row of ``flat`` (clients x coordinates).

    Score ``i`` = the sum of squared L2 distances from row ``i`` to its
    ``m - f - 2`` nearest other rows (at least 1 when ``m >= 2``; 0 for a
    single client).
    """
    x = np.asarray(flat, dtype=np.float64)
    m = x.shape[0]
    if m == 0:
        raise InvalidInputError("krum: no client updates")
    if f < 0:
        raise InvalidInputError(f"krum: f={f} must be >= 0")
    if m == 1:
        return np.zeros(1)
    d2 = np.empty((m, m))
    for i in range(m):  # differences, not the Gram trick: no cancellation for near rows
        diff = x - x[i]
        d2[i] = np.einsum("ij,ij->i", diff, diff)
    np.fill_diagonal(d2, np.inf)
    k = min(m - 1, max(1, m - f - 2))
    return np.sort(d2, axis=1)[:, :k].sum(axis=1)


def krum_select(flat: np.ndarray, f: int, k: int = 1) -> np.ndarray:
    """Indices of the ``k`` rows with the lowest Krum scores (ties: lower index first).

    ``k = 1`` is Krum, ``k > 1`` multi-Krum (the caller averages the rows).
    """
    scores = krum_scores(flat, f)
    if not 1 <= k <= scores.size:
        raise InvalidInputError(f"multi-krum: cannot select {k} of {scores.size} clients")
    return np.sort(np.argsort(scores, kind="stable")[:k])
