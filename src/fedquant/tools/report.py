"""What every report of the tools shares: JSON files, Markdown tables, the environment.

The generators of :mod:`fedquant.tools` (benchmarks, reproduction, robustness)
write their measurements as JSON and render Markdown from that JSON alone, so
a report can be re-rendered without re-running anything. This module holds the
pieces they have in common and nothing specific to any of them:

* :data:`Row`: one table row, a mapping of column name to value;
* :func:`write_json`: the one JSON writer (argument order ``(path, obj)``;
  NaN and ±Inf are written as ``null``);
* :func:`table`: a GitHub Markdown table;
* :func:`environment`, :func:`environment_line`: which software and machine
  produced the numbers, and :func:`source_commit`, which code (by git commit,
  never by a local path).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedquant.fl.files import atomic_write

__all__ = [
    "Row",
    "environment",
    "environment_line",
    "plain",
    "source_commit",
    "table",
    "write_json",
]

#: one row of a results table: column name -> value (JSON-serializable after :func:`plain`)
Row = dict[str, Any]

_SCALARS = (str, int, float, bool, type(None))


def plain(obj: Any, *, digits: int | None = None) -> Any:
    """``obj`` as plain JSON values: NumPy scalars and arrays to Python, NaN and ±Inf to None.

    Parameters
    ----------
    obj : any
        Nested mappings, lists and tuples of scalars, NumPy scalars or arrays.
    digits : int, optional
        Round finite floats to this many significant digits (measurements are
        not more precise than their noise); default: keep every digit.

    Returns
    -------
    any
        Dicts with ``str`` keys, lists, and ``str``/``int``/``float``/``bool``/``None``.

    Raises
    ------
    TypeError
        For a value that is none of these.

    Examples
    --------
    >>> plain({"a": float("nan"), "b": (1, 2.123456789)}, digits=3)
    {'a': None, 'b': [1, 2.12]}
    """
    if isinstance(obj, Mapping):
        return {str(k): plain(v, digits=digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, digits=digits) for v in obj]
    if not isinstance(obj, _SCALARS):
        if not hasattr(obj, "tolist"):  # NumPy arrays and scalars
            raise TypeError(f"not JSON serializable: {type(obj).__name__}")
        return plain(obj.tolist(), digits=digits)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        if digits is not None and obj != 0.0:
            return float(f"{obj:.{digits}g}")
    return obj


def _rows_per_line(o: Any, depth: int) -> str:
    """Indented JSON down to the rows; a dict or list of scalars stays on one line."""
    flat = json.dumps(o, allow_nan=False, separators=(", ", ": "))
    if not isinstance(o, (dict, list)):
        return flat
    values = o.values() if isinstance(o, dict) else o
    if all(isinstance(v, _SCALARS) for v in values):
        return flat
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(o, dict):
        items = [f"{inner}{json.dumps(k)}: {_rows_per_line(v, depth + 1)}" for k, v in o.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    items = [inner + _rows_per_line(v, depth + 1) for v in o]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]"


def write_json(
    path: str | os.PathLike[str], obj: Any, *, digits: int | None = None, rows: bool = False
) -> Path:
    """Write ``obj`` to ``path`` as JSON, atomically (the old file or the new, never half).

    NaN and ±Inf are written as ``null`` (JSON has neither): a diverged run's
    loss is still recorded, and readers treat ``null`` as "no value".

    Parameters
    ----------
    path : path
        The file; missing parent folders are created.
    obj : any
        What :func:`plain` accepts.
    digits : int, optional
        Significant digits kept of each float (default: all).
    rows : bool, default False
        One table row (a dict or list of scalars) per line, for files that are
        mostly tables; default: ``indent=2`` throughout.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    p = Path(path)
    data = plain(obj, digits=digits)
    text = _rows_per_line(data, 0) if rows else json.dumps(data, indent=2, allow_nan=False)
    with atomic_write(p, "w") as f:
        f.write(text + "\n")
    return p


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table (cells as given, ``str()`` of anything else).

    Examples
    --------
    >>> print(table(["bits", "bytes"], [[2, "1,024"]]))
    | bits | bytes |
    |---|---|
    | 2 | 1,024 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _git(where: str | os.PathLike[str], *args: str) -> str:
    cmd = ["git", "-C", str(where), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def source_commit(where: str | os.PathLike[str] | None = None) -> str | None:
    """The git commit of the checkout holding ``where`` (default: the imported fedquant).

    Returns ``<sha>+dirty`` when that folder has uncommitted changes, ``None``
    outside a git checkout or without git. Reports name this, never the
    folder itself (a local path says nothing to a reader elsewhere).
    """
    if where is None:
        import fedquant

        where = Path(fedquant.__file__).resolve().parent
    try:
        head = _git(where, "rev-parse", "HEAD")
        dirty = _git(where, "status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def _cpu_model() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        return cpu


def environment(packages: Sequence[str] = ("numpy", "torch")) -> Row:
    """Which software and machine produce a report's numbers.

    Parameters
    ----------
    packages : sequence of str
        Distributions whose installed versions to record (missing ones are
        left out).

    Returns
    -------
    Row
        ``python``, ``fedquant``, each of ``packages``, ``cpu`` (model name),
        ``cpu_count`` and ``commit`` (:func:`source_commit`, or None).
    """
    env: Row = {"python": platform.python_version()}
    for pkg in ("fedquant", *packages):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    env.update(cpu=_cpu_model(), cpu_count=os.cpu_count(), commit=source_commit())
    return env


def environment_line(env: Mapping[str, Any]) -> str:
    """:func:`environment`'s record as one Markdown line.

    Examples
    --------
    >>> environment_line({"python": "3.12.3", "numpy": "2.1.0", "cpu": "Xeon",
    ...                   "cpu_count": 2, "commit": "0123abc"})
    'Environment: python 3.12.3, numpy 2.1.0; CPU: Xeon (2 cores); source: commit `0123abc`.'
    """
    versions = ", ".join(
        f"{k} {v}" for k, v in env.items() if k not in ("cpu", "cpu_count", "commit")
    )
    commit = env.get("commit")
    source = f"commit `{commit}`" if commit else "commit not recorded"
    return (
        f"Environment: {versions}; CPU: {env.get('cpu', 'unknown')} "
        f"({env.get('cpu_count', '?')} cores); source: {source}."
    )
