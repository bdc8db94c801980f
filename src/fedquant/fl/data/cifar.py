"""The official CIFAR-10 python batches, read with a restricted unpickler."""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from fedquant.errors import DataError
from fedquant.fl.data.archive import open_tar
from fedquant.fl.data.dataset import CIFAR10_CLASSES, Dataset, StrPath, _describe

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
                try:
                    out[n] = (src / n).read_bytes()
                except OSError as e:
                    raise DataError(f"{src / n}: cannot read: {e.strerror or e}") from e
        return out
    with open_tar(src) as members:
        for m, f in members:
            base = PurePosixPath(m.name).name
            if f is not None and base in wanted:
                out[base] = f.read()
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
        try:
            classes = tuple(n.decode() if isinstance(n, bytes) else n for n in names)
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: 'label_names' are not UTF-8 text: {e}") from e
    return Dataset(
        name=name,
        train_x=np.concatenate([p[0] for p in parts]),
        train_y=np.concatenate([p[1] for p in parts]),
        test_x=test_x,
        test_y=test_y,
        classes=classes,
    )
