"""The results directory of a run: resolved config, versions, metrics, checkpoint, plots.

Layout of ``<out>/<run-name>/``::

    config.toml        the resolved configuration (rerun with --config)
    meta.json          seed, package versions, platform, start time, data summary
    clients.json       per-client label counts (the partition)
    metrics.jsonl      one JSON object per round
    summary.json       final figures (written at the end)
    checkpoint.npz     global model + round + metrics (+ error-feedback residuals), for --resume
    accuracy_vs_round.png, accuracy_vs_uplink.png

Every file is written atomically (temporary file in the same directory, then
``os.replace``): a crash at any moment leaves either the old or the new
version, never half a file. ``metrics.jsonl`` is rewritten whole each round.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedquant.errors import ConfigError, DataError
from fedquant.fl.config import FIELDS, RunConfig

CHECKPOINT = "checkpoint.npz"
_STATE_PREFIX = "state/"
_RESIDUAL_PREFIX = "residual/"
_SERVER_OPT_PREFIX = "server_opt/"


class Checkpoint(NamedTuple):
    """What :meth:`ResultsDir.read_checkpoint` returns."""

    round: int
    global_state: dict[str, np.ndarray]
    metrics: list[dict[str, Any]]
    #: error feedback: client id -> residual per tensor (empty without it)
    residuals: dict[int, dict[str, np.ndarray]]
    #: the server optimizer's state (empty without one)
    server_opt: dict[str, np.ndarray]


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Write ``path`` via a temporary sibling and ``os.replace`` (with fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """NaN/Inf -> None, recursively (JSON has no NaN)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(_clean(obj), f, indent=2, default=_json_default)
        f.write("\n")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("fedquant", "torch", "numpy", "numba", "flwr"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def config_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (every key, with its help text as a comment)."""
    lines = [
        "# fedquant run configuration (resolved): rerun with `fedquant run --config THIS_FILE`"
    ]
    for key, value in cfg.to_dict().items():
        lines.append(f"# {FIELDS[key].help}")
        if value is None:
            lines.append(f"# {key} = (unset)")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")
    return "\n".join(lines) + "\n"


def read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("config", f"file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config", f"{str(path)!r} is not valid TOML: {e}") from None


class ResultsDir:
    """Writes (and, for --resume, reads) one run's results directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lines: list[tuple[dict[str, Any], str]] = []  # rows written so far, as JSON

    def _row_lines(self, metrics: list[dict[str, Any]]) -> list[str]:
        """Every row as one line of JSON; a row already written is not serialized again.

        A run only appends rows (it never changes one once it is in ``metrics``),
        so re-serializing the whole history every round is wasted work that grows
        with the number of rounds. A row is recognized by identity, not by value.
        """
        lines = []
        for i, row in enumerate(metrics):
            if i < len(self._lines) and self._lines[i][0] is row:
                lines.append(self._lines[i][1])
                continue
            line = json.dumps(_clean(row), default=_json_default)
            del self._lines[i:]
            self._lines.append((row, line))
            lines.append(line)
        del self._lines[len(metrics) :]
        return lines

    @classmethod
    def create(cls, out: str, cfg: RunConfig) -> ResultsDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        bits = cfg.bits.replace(":", "")  # 'auto:2.03' -> 'auto2.03' (no ':' in paths)
        base = Path(out) / f"{stamp}-{cfg.dataset}-b{bits}-{cfg.aggregation}-s{cfg.seed}"
        path, i = base, 1
        while path.exists():
            i += 1
            path = base.with_name(f"{base.name}-{i}")
        path.mkdir(parents=True)
        return cls(path)

    def write_start(self, cfg: RunConfig, extra: Mapping[str, Any]) -> None:
        with atomic_write(self.path / "config.toml", "w") as f:
            f.write(config_toml(cfg))
        write_json(self.path / "meta.json", {"seed": cfg.seed, "versions": versions(), **extra})

    def write_round(
        self,
        round_: int,
        global_state: Mapping[str, np.ndarray],
        metrics: list[dict[str, Any]],
        *,
        residuals: Mapping[int, Mapping[str, np.ndarray]] | None = None,
        server_opt: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Checkpoint first, then the metrics file: both atomic.

        ``residuals`` (error feedback, client id -> tensors) and the server
        optimizer's state ``server_opt`` are stored too.
        """
        buf = io.BytesIO()
        arrays = {f"{_STATE_PREFIX}{k}": np.asarray(v) for k, v in global_state.items()}
        for client, tensors in (residuals or {}).items():
            for k, v in tensors.items():
                arrays[f"{_RESIDUAL_PREFIX}{int(client)}/{k}"] = np.asarray(v)
        for k, v in (server_opt or {}).items():
            arrays[f"{_SERVER_OPT_PREFIX}{k}"] = np.asarray(v)
        lines = self._row_lines(metrics)
        # = json.dumps({"round": round_, "metrics": metrics}) from the rows' own JSON
        meta = f'{{"round": {int(round_)}, "metrics": [{", ".join(lines)}]}}'
        arrays["__meta__"] = np.frombuffer(meta.encode(), dtype=np.uint8)
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        with atomic_write(self.path / CHECKPOINT) as f:
            f.write(buf.getvalue())
        with atomic_write(self.path / "metrics.jsonl", "w") as f:
            f.write("".join(line + "\n" for line in lines))

    def read_config(self) -> RunConfig:
        return RunConfig.from_mapping(
            read_toml(self.path / "config.toml"), source=str(self.path / "config.toml")
        )

    def read_checkpoint(self) -> Checkpoint | None:
        p = self.path / CHECKPOINT
        if not p.exists():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(bytes(z["__meta__"]).decode())
                state = {
                    k[len(_STATE_PREFIX) :]: z[k] for k in z.files if k.startswith(_STATE_PREFIX)
                }
                residuals: dict[int, dict[str, np.ndarray]] = {}
                for k in z.files:
                    if k.startswith(_RESIDUAL_PREFIX):
                        client, _, name = k[len(_RESIDUAL_PREFIX) :].partition("/")
                        residuals.setdefault(int(client), {})[name] = z[k]
                server_opt = {
                    k[len(_SERVER_OPT_PREFIX) :]: z[k]
                    for k in z.files
                    if k.startswith(_SERVER_OPT_PREFIX)
                }
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"checkpoint {str(p)!r} is unreadable: {e}") from e
        return Checkpoint(int(meta["round"]), state, list(meta["metrics"]), residuals, server_opt)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)

    def write_plots(
        self, metrics: list[dict[str, Any]], title: str, metric: str = "accuracy"
    ) -> list[Path]:
        """``<metric>_vs_round.png`` and ``<metric>_vs_uplink.png`` (accuracy in percent)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = f"test_{metric}"
        rows = [m for m in metrics if m.get(key) is not None]
        if not rows:
            return []
        rounds = [m["round"] for m in rows]
        scale = 100 if metric == "accuracy" else 1
        acc = [scale * m[key] for m in rows]
        mb = [m["cum_uplink_bytes"] / 1e6 for m in rows]
        paths = []
        for name, xs, xlabel in (
            (f"{metric}_vs_round.png", rounds, "round"),
            (
                f"{metric}_vs_uplink.png",
                mb,
                "cumulative uplink traffic (MB, measured payload bytes)",
            ),
        ):
            fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
            ax.plot(xs, acc, marker="o", ms=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%)" if metric == "accuracy" else f"test {metric}")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            with atomic_write(self.path / name) as f:
                fig.savefig(f, format="png")
            plt.close(fig)
            paths.append(self.path / name)
        return paths
