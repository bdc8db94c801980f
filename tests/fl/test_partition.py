"""Tests of fedquant.fl.partition: covers, determinism, skew, error paths."""

from __future__ import annotations

import numpy as np
import pytest

from fedquant.errors import ConfigError
from fedquant.fl.partition import SCHEMES, label_counts, label_skew, partition

#: 10 balanced classes x 1,000 samples, in a shuffled order
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 1000))


def _assert_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique"
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "every sample exactly once"
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_clients", [1, 7, 100])
def test_disjoint_cover(scheme: str, num_clients: int) -> None:
    parts = partition(LABELS, num_clients, scheme, seed=3, alpha=1.0)
    _assert_cover(parts, len(LABELS), num_clients)


@pytest.mark.parametrize("n,k", [(10, 3), (10_000, 7), (5, 5), (1, 1)])
def test_iid_sizes_near_equal(n: int, k: int) -> None:
    parts = partition(np.zeros(n, dtype=np.int64), k, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == n


def test_iid_is_not_the_identity_order() -> None:
    # a seeded shuffle: client 0 must not simply receive the first n/k indices
    parts = partition(LABELS, 10, "iid", seed=0)
    assert not np.array_equal(parts[0], np.arange(1000))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_partition_different_seed_different(scheme: str) -> None:
    a = partition(LABELS, 20, scheme, seed=11)
    b = partition(LABELS, 20, scheme, seed=11)
    c = partition(LABELS, 20, scheme, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_global_rng_untouched() -> None:
    np.random.seed(5)  # noqa: NPY002 - checking that the legacy global state is left alone
    for scheme in SCHEMES:
        partition(LABELS, 10, scheme, seed=1)
    after = np.random.random()  # noqa: NPY002
    np.random.seed(5)  # noqa: NPY002
    assert after == np.random.random()  # noqa: NPY002


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_skew_grows_as_alpha_falls(seed: int) -> None:
    skew = {
        a: label_skew(LABELS, partition(LABELS, 20, "dirichlet", alpha=a, seed=seed))
        for a in (0.1, 1.0, 100.0)
    }
    # measured at seed 0: 0.71, 0.33, 0.04 -- far apart, so a strict order is a safe test
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.5 and skew[100.0] < 0.1


def test_iid_skew_small() -> None:
    # 20 clients of 500 samples: sampling noise alone gives TV ~ 0.05 (measured 0.050)
    assert label_skew(LABELS, partition(LABELS, 20, "iid", seed=0)) < 0.1


def test_dirichlet_respects_min_size() -> None:
    parts = partition(LABELS, 20, "dirichlet", alpha=0.3, seed=0, min_size=100)
    assert min(len(p) for p in parts) >= 100
    _assert_cover(parts, len(LABELS), 20)


def test_dirichlet_gives_up_with_clear_error() -> None:
    # alpha=0.01: each class lands on ~1 client, so 50 clients cannot all get a sample
    with pytest.raises(ConfigError, match=r"min_size: 100 Dirichlet\(alpha=0.01\) draws"):
        partition(LABELS, 50, "dirichlet", alpha=0.01, seed=0)


def test_dirichlet_sizes_vary() -> None:
    parts = partition(LABELS, 20, "dirichlet", alpha=0.5, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) > 2 * min(sizes)


@pytest.mark.parametrize("s", [1, 2, 5])
def test_shards_classes_per_client(s: int) -> None:
    # 100 clients x s shards: shards of 100/s samples never straddle a class of 1,000
    parts = partition(LABELS, 100, "shards", shards_per_client=s, seed=0)
    classes_per_client = (label_counts(LABELS, parts, 10) > 0).sum(axis=1)
    assert classes_per_client.max() <= s
    assert all(len(p) == 100 for p in parts)


def test_shards_uneven_sizes_straddle_at_most_one_boundary_each() -> None:
    # 300 shards of 33 or 34 samples: a shard may straddle two classes
    parts = partition(LABELS, 100, "shards", shards_per_client=3, seed=0)
    classes_per_client = (label_counts(LABELS, parts, 10) > 0).sum(axis=1)
    assert classes_per_client.max() <= 6
    assert np.median(classes_per_client) <= 3
    assert {len(p) for p in parts} <= {99, 100, 101, 102}


def test_shards_skew_exact_for_one_class_per_client() -> None:
    parts = partition(LABELS, 10, "shards", shards_per_client=1, seed=4)
    counts = label_counts(LABELS, parts, 10)
    # every client holds exactly one whole class
    np.testing.assert_array_equal(np.sort(counts, axis=1)[:, -1], 1000)
    assert np.count_nonzero(counts) == 10
    assert label_skew(LABELS, parts) == pytest.approx(0.9, abs=1e-12)  # 1 - 1/C


def test_label_counts_matches_reference() -> None:
    parts = partition(LABELS, 13, "dirichlet", alpha=0.5, seed=2)
    counts = label_counts(LABELS, parts, 12)  # more classes than present: zero columns
    assert counts.shape == (13, 12) and counts.dtype == np.int64
    for i, p in enumerate(parts):
        for c in range(12):
            assert counts[i, c] == int(np.sum(LABELS[p] == c))
    np.testing.assert_array_equal(counts.sum(axis=0)[:10], np.full(10, 1000))


def test_label_skew_zero_for_mirrored_clients() -> None:
    labels = np.tile(np.arange(4), 3)  # 0 1 2 3 0 1 2 3 0 1 2 3
    parts = [np.arange(0, 4), np.arange(4, 8), np.arange(8, 12)]
    assert label_skew(labels, parts) == 0.0


def test_label_skew_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1])
    parts = [np.array([0, 1, 2]), np.array([3])]
    # global (1/2, 1/2); client 0 (2/3, 1/3) -> TV 1/6; client 1 (0, 1) -> TV 1/2
    assert label_skew(labels, parts) == pytest.approx((1 / 6 + 1 / 2) / 2, abs=1e-15)


def test_accepts_lists_and_other_int_dtypes() -> None:
    parts = partition([0, 1, 0, 1, 2, 2], 2, "iid", seed=0)
    _assert_cover(parts, 6, 2)
    parts = partition(
        np.array([0, 1, 0, 1], dtype=np.uint8), 2, "shards", shards_per_client=1, seed=0
    )
    _assert_cover(parts, 4, 2)


# --------------------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_clients": 0}, r"num_clients: got 0, expected an integer between 1 and 10000"),
        (
            {"num_clients": 10_001},
            r"num_clients: got 10001, expected an integer between 1 and 10000",
        ),
        ({"num_clients": 2.0}, r"num_clients: expected an integer, got 2.0"),
        ({"num_clients": True}, r"num_clients: expected an integer, got True"),
        (
            {"scheme": "noniid"},
            r"scheme: unknown scheme 'noniid'; expected one of: iid, dirichlet, shards",
        ),
        ({"scheme": "dirichlet", "alpha": 0.0}, r"alpha: expected a finite number > 0, got 0.0"),
        ({"scheme": "dirichlet", "alpha": -1}, r"alpha: expected a finite number > 0, got -1.0"),
        (
            {"scheme": "dirichlet", "alpha": float("nan")},
            r"alpha: expected a finite number > 0, got nan",
        ),
        (
            {"scheme": "dirichlet", "alpha": float("inf")},
            r"alpha: expected a finite number > 0, got inf",
        ),
        ({"scheme": "dirichlet", "alpha": "1"}, r"alpha: expected a finite number > 0, got '1'"),
        (
            {"scheme": "shards", "shards_per_client": 0},
            r"shards_per_client: got 0, expected an integer >= 1",
        ),
        (
            {"num_clients": 5000, "scheme": "shards", "shards_per_client": 3},
            r"shards_per_client: 5000 clients x 3 shards = 15000 shards, more than the 10000 samples",
        ),
        (
            {"min_size": 3000, "num_clients": 4},
            r"min_size: 4 clients x min_size 3000 exceeds the 10000",
        ),
        ({"min_size": -1}, r"min_size: got -1, expected an integer >= 0"),
        ({"seed": -1}, r"seed: got -1, expected an integer >= 0"),
        ({"seed": None}, r"seed: expected an integer, got None"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"num_clients": 10, "scheme": "iid", "seed": 0}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        partition(LABELS, **args)  # type: ignore[arg-type]


def test_min_size_checked_for_shards() -> None:
    # 10 samples in 6 shards of 2, 2, 2, 2, 1, 1; seed 7 gives one client both 1-sample shards
    y = np.arange(10) % 2
    sizes = [len(p) for p in partition(y, 3, "shards", shards_per_client=2, seed=7)]
    assert sizes == [4, 2, 4]
    with pytest.raises(
        ConfigError, match=r"min_size: scheme 'shards' gives a client only 2 samples"
    ):
        partition(y, 3, "shards", shards_per_client=2, seed=7, min_size=3)


@pytest.mark.parametrize(
    "labels,match",
    [
        (
            np.zeros((3, 2), dtype=np.int64),
            r"labels: expected a non-empty 1-d integer array.*shape \(3, 2\)",
        ),
        (
            np.zeros(4, dtype=np.float32),
            r"labels: expected a non-empty 1-d integer array, got dtype float32",
        ),
        (
            np.zeros(0, dtype=np.int64),
            r"labels: expected a non-empty 1-d integer array.*shape \(0,\)",
        ),
        (np.array([0, -1, 2]), r"labels: labels must be >= 0, found -1"),
    ],
)
def test_bad_labels(labels: np.ndarray, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        partition(labels, 1, seed=0)


def test_label_counts_rejects_small_num_classes() -> None:
    with pytest.raises(ConfigError, match=r"num_classes: got 5, but a label is 9"):
        label_counts(LABELS, [np.arange(10)], 5)


def test_label_skew_rejects_all_empty() -> None:
    with pytest.raises(ConfigError, match=r"parts: no client holds any sample"):
        label_skew(LABELS, [np.array([], dtype=np.int64)])
