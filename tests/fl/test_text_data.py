"""The byte-level text corpora: the standard-library corpus, user folders, windows."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fedquant.errors import DataError, InvalidInputError
from fedquant.fl.data.text import (
    STDLIB_FILES,
    TEST_FRACTION,
    corpus_sha256,
    load_stdlib_corpus,
    load_text_folder,
    sample_windows,
    split_file,
    stdlib_root,
    text_windows,
    tile_windows,
)


def test_stdlib_corpus_is_the_listed_files_split_head_and_tail() -> None:
    c = load_stdlib_corpus()
    assert c.clients == tuple(STDLIB_FILES)
    root = stdlib_root()
    for client, files, train, test in zip(c.clients, c.files, c.train, c.test, strict=True):
        assert files == STDLIB_FILES[client]
        blobs = [(root / f).read_bytes() for f in files]
        # each file contributes its head to train and its tail to test, in list order
        assert train + test != b"".join(blobs)  # the tails are not simply appended
        heads = b"".join(b[: len(b) - round(TEST_FRACTION * len(b))] for b in blobs)
        tails = b"".join(b[len(b) - round(TEST_FRACTION * len(b)) :] for b in blobs)
        assert train == heads and test == tails
        assert len(test) / (len(train) + len(test)) == pytest.approx(TEST_FRACTION, abs=1e-3)


def test_stdlib_corpus_hash_covers_paths_and_bytes(tmp_path: Path) -> None:
    c = load_stdlib_corpus()
    # an independent computation of the documented formula
    h = hashlib.sha256()
    for files in c.files:
        for rel in files:
            data = (stdlib_root() / rel).read_bytes()
            h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    assert c.sha256 == h.hexdigest()
    # a copy of the standard library with one byte changed has another hash
    copy = tmp_path / "lib"
    for files in STDLIB_FILES.values():
        for rel in files:
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(stdlib_root() / rel, copy / rel)
    assert load_stdlib_corpus(copy).sha256 == c.sha256
    target = copy / STDLIB_FILES["json"][0]
    target.write_bytes(target.read_bytes() + b"#")
    assert load_stdlib_corpus(copy).sha256 != c.sha256


def test_stdlib_corpus_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing from .*json/__init__\.py"):
        load_stdlib_corpus(tmp_path)


def test_split_file_tail_is_the_test_fraction() -> None:
    assert split_file(b"0123456789") == (b"012345678", b"9")
    assert split_file(b"") == (b"", b"")
    head, tail = split_file(bytes(range(200)))
    assert len(tail) == 20 and head + tail == bytes(range(200))


def test_folder_of_files_is_one_client_per_file(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"b" * 100)
    (tmp_path / "a.txt").write_bytes(b"a" * 50)
    (tmp_path / ".hidden").write_bytes(b"x" * 100)
    c = load_text_folder(tmp_path)
    assert c.name == "text"
    assert c.clients == ("a.txt", "b.txt")
    assert c.train == (b"a" * 45, b"b" * 90) and c.test == (b"a" * 5, b"b" * 10)
    assert c.sha256 == corpus_sha256(tmp_path, c.files, [b"a" * 50, b"b" * 100])


def test_folder_of_folders_is_one_client_per_folder(tmp_path: Path) -> None:
    for d, files in {
        "x": {"1.txt": b"1" * 20, "sub/2.txt": b"2" * 30},
        "y": {"3.txt": b"3" * 40},
    }.items():
        for name, data in files.items():
            (tmp_path / d / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / d / name).write_bytes(data)
    (tmp_path / "x" / ".git").mkdir()
    (tmp_path / "x" / ".git" / "HEAD").write_bytes(b"ignored")
    c = load_text_folder(tmp_path)
    assert c.clients == ("x", "y")
    assert c.files == (("x/1.txt", "x/sub/2.txt"), ("y/3.txt",))
    assert c.train[0] == b"1" * 18 + b"2" * 27 and c.test[0] == b"1" * 2 + b"2" * 3


def _mixed(p: Path) -> None:
    (p / "d").mkdir()
    (p / "d" / "f").write_bytes(b"x" * 50)
    (p / "g").write_bytes(b"y" * 50)


def _tiny(p: Path) -> None:
    (p / "tiny").write_bytes(b"abc")


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: None, "holds no"),
        (_mixed, r"both sub-folders .* and loose files \(g\)"),
        (_tiny, r"client 'tiny' \(tiny\) has 3 training and 0 test bytes"),
    ],
)
def test_folder_errors(tmp_path: Path, setup: Callable[[Path], None], match: str) -> None:
    setup(tmp_path)
    with pytest.raises(DataError, match=match):
        load_text_folder(tmp_path)


def test_folder_root_missing_or_not_given(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no root given"):
        load_text_folder(None)
    with pytest.raises(DataError, match="is not a folder"):
        load_text_folder(tmp_path / "nope")


def test_windows_are_shifted_by_one_byte() -> None:
    text = bytes(range(100))
    w = sample_windows(text, 8, 50, np.random.default_rng(0))
    assert w.x.shape == w.y.shape == (50, 8) and w.x.dtype == torch.int64
    assert torch.equal(w.y[:, :-1], w.x[:, 1:])
    assert torch.equal(w.y[:, -1], w.x[:, -1] + 1)  # the byte after the window
    assert int(w.x[:, 0].max()) <= 100 - 9  # every window fits
    # seeded: the same generator seed gives the same windows, another gives others
    again = sample_windows(text, 8, 50, np.random.default_rng(0))
    other = sample_windows(text, 8, 50, np.random.default_rng(1))
    assert torch.equal(w.x, again.x) and not torch.equal(w.x, other.x)


def test_sample_windows_too_short() -> None:
    with pytest.raises(InvalidInputError, match="too short for one window of context 8"):
        sample_windows(b"12345678", 8, 1, np.random.default_rng(0))


def test_tile_windows_do_not_overlap_and_spread() -> None:
    text = bytes(range(101))
    w = tile_windows(text, 10)
    assert w.x[:, 0].tolist() == list(range(0, 100, 10))
    assert torch.equal(w.y[-1], torch.arange(91, 101))
    spread = tile_windows(text, 10, limit=4)
    assert spread.x[:, 0].tolist() == [0, 30, 60, 90]


def test_text_windows_counts_and_test_tiles() -> None:
    c = load_stdlib_corpus()
    s = text_windows(
        c,
        context=16,
        train_windows=20,
        test_windows=25,
        rng_for_client=lambda k: np.random.default_rng(k),
    )
    assert [len(w) for w in s.clients] == [20] * len(c.clients)
    assert len(s.test) == 3 * len(c.clients)  # ceil(25 / 10) per client
    # every test window is a piece of its client's test text, not of its training text
    first = bytes(s.test.x[0].numpy().astype(np.uint8)) + bytes([int(s.test.y[0, -1])])
    assert first in c.test[0] and first == c.test[0][:17]


def test_text_windows_client_too_small(tmp_path: Path) -> None:
    (tmp_path / "small").write_bytes(b"z" * 100)
    c = load_text_folder(tmp_path)
    with pytest.raises(
        DataError, match=r"client 'small' has 90 training and 10 test bytes; a window of context 32"
    ):
        text_windows(
            c, context=32, train_windows=4, test_windows=4, rng_for_client=np.random.default_rng
        )
