"""IDX files, the MNIST format (MNIST, Fashion-MNIST): parsing and loading."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedquant.errors import DataError
from fedquant.fl.data.archive import expansion_limit, open_decompressed
from fedquant.fl.data.dataset import MNIST_CLASSES, Dataset, StrPath

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
    dims = _idx_dims(buf[:header], ndim, source)
    expected = math.prod(dims)  # a Python int: dimensions near 2**32 cannot overflow it
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


def _idx_dims(head: bytes, ndim: int, source: str) -> tuple[int, ...]:
    """The dimensions an IDX header announces (after checking its length and magic)."""
    header = 4 + 4 * ndim
    if len(head) < header:
        raise DataError(
            f"{source}: file is {len(head)} bytes, too short for an IDX header ({header} bytes)"
        )
    magic = int.from_bytes(head[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(
            f"{source}: wrong magic number 0x{magic:08x}, expected 0x{_IDX_MAGIC[ndim]:08x} "
            f"(IDX {'label' if ndim == 1 else 'image'} file of unsigned bytes)"
        )
    return tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read and parse one IDX file, gzip-compressed or raw (detected by content).

    Only the data the header announces is read (plus one byte, to detect
    trailing data), never more than the file's bounded expansion (see
    :mod:`fedquant.fl.data.archive`); a compressed file's checksum is verified.
    """
    header = 4 + 4 * ndim
    with open_decompressed(path) as f:
        head = f.read(header)
        expected = math.prod(_idx_dims(head, ndim, str(path)))
        cap = expansion_limit(path.stat().st_size)
        body = f.read(min(expected, cap) + 1)
    return parse_idx(head + body, ndim=ndim, source=str(path))


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
    arrays = {key: _read_idx(p, ndim=3 if key.endswith("x") else 1) for key, p in paths.items()}
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
