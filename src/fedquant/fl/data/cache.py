"""The cache of decoded arrays: one folder of ``.npy`` files per source fingerprint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fedquant.errors import DataError
from fedquant.fl.data.dataset import Dataset
from fedquant.fl.files import atomic_write, remove_stale_temps

#: bump when the cache layout or a decoder's output changes: old entries are then ignored.
_CACHE_VERSION = 1

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
    remove_stale_temps(entry)  # left by a process killed while writing this entry
    with contextlib.suppress(FileNotFoundError):
        (entry / "meta.json").unlink()  # the entry is invalid until meta.json is back
    for k in _ARRAYS:
        with atomic_write(entry / f"{k}.npy", fsync=False) as f:
            np.save(f, getattr(ds, k), allow_pickle=False)
    meta = {
        "fingerprint": fingerprint,
        "source_id": source_id,
        "name": ds.name,
        "classes": list(ds.classes),
        "shapes": {k: list(getattr(ds, k).shape) for k in _ARRAYS},
    }
    with atomic_write(entry / "meta.json", fsync=False) as f:
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
