"""Crash-safe file writing shared by the results directory and the data cache.

A file is written to a temporary sibling named ``.<name>.<random>.tmp`` and
moved over its final name with ``os.replace`` once complete and flushed to
disk: a crash at any moment leaves the old version or the new one, never half
a file. What a crash can leave behind is the temporary file itself;
:func:`remove_stale_temps` deletes those of a folder, and callers run it when
they take a folder over (a resumed run, a rebuilt cache entry).

Files are created with the permissions ``open()`` would give them
(``0o666`` less the process umask), not the ``0o600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: suffix of every temporary file written here (what :func:`remove_stale_temps` matches)
TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")


def umask() -> int:
    """The process umask (read without changing it where the platform allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # no way to read it without setting it
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode ``open(path, "w")`` would create a file with: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", *, fsync: bool = True) -> Iterator[Any]:
    """Write ``path`` via a temporary sibling and ``os.replace`` (with fsync by default).

    The file gets the umask's permissions; on any error the temporary file is
    removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), file_mode())
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` (e.g. after a kill).

    Only names of the form ``.<name>.<random>.tmp`` are touched. Returns what
    was removed; a file that cannot be removed is left alone.
    """
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        if _TEMP_RE.match(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
