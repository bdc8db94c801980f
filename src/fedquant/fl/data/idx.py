"""IDX files, the MNIST format (MNIST, Fashion-MNIST): parsing and loading."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedquant.errors import DataError
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
