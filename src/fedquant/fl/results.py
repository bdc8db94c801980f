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
``os.replace``, see :mod:`fedquant.fl.files`): a crash at any moment leaves
either the old or the new version, never half a file, and files get the
umask's permissions. ``metrics.jsonl`` is rewritten whole each round. The
directory itself is prepared under a hidden staging name with ``config.toml``,
``meta.json`` and ``clients.json`` and renamed before round 1, so no kill
leaves a run directory without them. The checkpoint records the run's
configuration; ``--resume`` refuses a ``config.toml`` edited since (see
:meth:`ResultsDir.check_checkpoint`), except a raised ``rounds``. A directory
that cannot be written (missing, read-only, full) is a one-line
:class:`~fedquant.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedquant.errors import ConfigError, DataError
from fedquant.fl.config import FIELDS, RunConfig, config_differences
from fedquant.fl.files import atomic_write, remove_stale_temps

__all__ = [
    "CHECKPOINT",
    "Checkpoint",
    "ResultsDir",
    "atomic_write",
    "config_toml",
    "read_toml",
    "write_json",
]

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
    #: the run's configuration (``RunConfig.to_dict()``); None in older checkpoints
    config: dict[str, Any] | None = None


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


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


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


def read_toml(path: Path, option: str = "config") -> dict[str, Any]:
    """Parse the TOML file ``path``; every problem is a one-line :class:`ConfigError` on ``option``."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(option, f"file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(option, f"{str(path)!r} is a directory; expected a TOML file") from None
    except OSError as e:
        raise ConfigError(option, f"cannot read {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            option, f"{str(path)!r} is not UTF-8 text (byte {e.start}); TOML files must be UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(option, f"{str(path)!r} is not valid TOML: {e}") from None


#: a new run directory is prepared under this prefix, then renamed to its final name
_STAGING_PREFIX = ".staging-"
#: a staging folder older than this is a leftover of a killed start (starting takes < 1 s)
_STAGING_MAX_AGE_S = 3600.0


def _remove_stale_staging(out: Path) -> None:
    now = time.time()
    with contextlib.suppress(OSError):
        for p in out.glob(f"{_STAGING_PREFIX}*"):
            with contextlib.suppress(OSError):
                if p.is_dir() and now - p.stat().st_mtime > _STAGING_MAX_AGE_S:
                    shutil.rmtree(p, ignore_errors=True)


class ResultsDir:
    """Writes (and, for --resume, reads) one run's results directory.

    Parameters
    ----------
    path : pathlib.Path
        The run's directory.
    option : str, default "out"
        The option named when the directory cannot be written (a full or
        read-only file system): a one-line :class:`ConfigError` on it.
    """

    def __init__(self, path: Path, *, option: str = "out") -> None:
        self.path = Path(path)
        self.option = option
        #: the run's configuration, recorded in every checkpoint once known
        self.config: RunConfig | None = None
        self._lines: list[tuple[dict[str, Any], str]] = []  # rows written so far, as JSON

    @contextlib.contextmanager
    def _writing(self, what: Path) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise ConfigError(self.option, f"cannot write {str(what)!r}: {e.strerror or e}") from e

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
    def create(
        cls,
        out: str,
        cfg: RunConfig,
        extra: Mapping[str, Any] | None = None,
        clients: Mapping[str, Any] | None = None,
        *,
        option: str = "out",
        data_name: str | None = None,
    ) -> ResultsDir:
        """Create ``<out>/<stamp>-<data>-b<bits>-<aggregation>-s<seed>[-i]/`` with its start files.

        ``<data>`` is ``data_name`` (default ``cfg.dataset``); ``<bits>`` is
        ``mixed`` when clients use different widths (``cfg.client_bits``).

        ``config.toml``, ``meta.json`` (``extra`` added to it) and, if given,
        ``clients.json`` are written into a hidden staging folder that is then
        renamed: the run directory appears complete or not at all, whenever the
        process is killed. Staging folders left by a killed start are removed.
        """
        stamp = time.strftime("%Y%m%d-%H%M%S")
        bits = cfg.bits.replace(":", "")  # 'auto:2.03' -> 'auto2.03' (no ':' in paths)
        if cfg.client_bits:
            bits = "mixed"
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (data_name or cfg.dataset))
        out_dir = Path(out)
        base = out_dir / f"{stamp}-{name}-b{bits}-{cfg.aggregation}-s{cfg.seed}"
        staging = cls(out_dir / f"{_STAGING_PREFIX}{base.name}-{os.getpid()}", option=option)
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(option, f"{str(out_dir)!r} is a file, not a directory")
        with staging._writing(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_staging(out_dir)
            shutil.rmtree(staging.path, ignore_errors=True)
            staging.path.mkdir(mode=0o777)  # the umask applies, as for any new folder
        try:
            staging.write_start(cfg, extra or {}, clients)
            path, i = base, 1
            while True:
                try:
                    if not path.exists():  # rename replaces an *empty* folder on POSIX
                        os.rename(staging.path, path)
                        break
                except OSError as e:
                    if not path.exists():
                        raise ConfigError(
                            option, f"cannot create {str(path)!r}: {e.strerror or e}"
                        ) from e
                i += 1
                path = base.with_name(f"{base.name}-{i}")
        except BaseException as e:
            shutil.rmtree(staging.path, ignore_errors=True)
            if isinstance(e, ConfigError) and isinstance(e.__cause__, OSError):
                why = e.__cause__.strerror or e.__cause__
                raise ConfigError(option, f"cannot write to {str(out_dir)!r}: {why}") from e
            raise
        rd = cls(path, option=option)
        rd.config = cfg
        return rd

    def write_start(
        self,
        cfg: RunConfig,
        extra: Mapping[str, Any],
        clients: Mapping[str, Any] | None = None,
    ) -> None:
        """Write ``config.toml``, ``meta.json`` and (if given) ``clients.json``."""
        self.config = cfg
        with (
            self._writing(self.path / "config.toml"),
            atomic_write(self.path / "config.toml", "w") as f,
        ):
            f.write(config_toml(cfg))
        with self._writing(self.path / "meta.json"):
            write_json(self.path / "meta.json", {"seed": cfg.seed, "versions": versions(), **extra})
        if clients is not None:
            with self._writing(self.path / "clients.json"):
                write_json(self.path / "clients.json", clients)

    def remove_stale_temps(self) -> list[Path]:
        """Delete temporary files a killed process left in the directory."""
        return remove_stale_temps(self.path)

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
        optimizer's state ``server_opt`` are stored too, and so is :attr:`config`
        (what ``--resume`` compares ``config.toml`` with).
        """
        buf = io.BytesIO()
        arrays = {f"{_STATE_PREFIX}{k}": np.asarray(v) for k, v in global_state.items()}
        for client, tensors in (residuals or {}).items():
            for k, v in tensors.items():
                arrays[f"{_RESIDUAL_PREFIX}{int(client)}/{k}"] = np.asarray(v)
        for k, v in (server_opt or {}).items():
            arrays[f"{_SERVER_OPT_PREFIX}{k}"] = np.asarray(v)
        lines = self._row_lines(metrics)
        # = json.dumps({"round": round_, "metrics": metrics, ...}) from the rows' own JSON
        config = "" if self.config is None else f', "config": {json.dumps(self.config.to_dict())}'
        meta = f'{{"round": {int(round_)}, "metrics": [{", ".join(lines)}]{config}}}'
        arrays["__meta__"] = np.frombuffer(meta.encode(), dtype=np.uint8)
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        with self._writing(self.path / CHECKPOINT), atomic_write(self.path / CHECKPOINT) as f:
            f.write(buf.getvalue())
        with (
            self._writing(self.path / "metrics.jsonl"),
            atomic_write(self.path / "metrics.jsonl", "w") as f,
        ):
            f.write("".join(line + "\n" for line in lines))

    def read_config(self) -> RunConfig:
        """The run's ``config.toml`` (also kept as :attr:`config`)."""
        self.config = RunConfig.from_mapping(
            read_toml(self.path / "config.toml", option=self.option),
            source=str(self.path / "config.toml"),
        )
        return self.config

    def read_checkpoint(self) -> Checkpoint | None:
        """The checkpoint, or ``None`` if there is none yet.

        Raises
        ------
        DataError
            If the file is empty, truncated or otherwise not a checkpoint.
        """
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
            round_, metrics = meta["round"], meta["metrics"]
            config = meta.get("config")
            if not isinstance(round_, int) or round_ < 0 or not isinstance(metrics, list):
                raise ValueError(
                    f"bad round {round_!r} or metrics of type {type(metrics).__name__}"
                )
            if config is not None and not isinstance(config, dict):
                raise ValueError(f"bad config record of type {type(config).__name__}")
        except Exception as e:  # any damage (empty, truncated, bad zip, bad JSON) ends here
            why = "empty file" if _is_empty(p) else f"{type(e).__name__}: {e}"
            raise DataError(
                f"checkpoint {str(p)!r} is unreadable ({why}); delete it to restart the run "
                "from round 0"
            ) from e
        return Checkpoint(round_, state, metrics, residuals, server_opt, config)

    def check_checkpoint(
        self, ck: Checkpoint, template: Mapping[str, np.ndarray] | None = None
    ) -> None:
        """Refuse a checkpoint that does not fit the model or the configuration.

        Parameters
        ----------
        ck : Checkpoint
            What :meth:`read_checkpoint` returned.
        template : mapping of str to numpy.ndarray, optional
            The freshly built model's state: names, shapes and dtypes to match
            (not checked if omitted).

        Raises
        ------
        ConfigError
            If ``config.toml`` differs from the configuration the checkpoint
            records in a field that changes results (every field but where
            and how fast the run executes, see
            :data:`fedquant.fl.config.OPERATIONAL_FIELDS`), or ``rounds`` is
            below the rounds already done. ``rounds`` may be raised.
        DataError
            If the checkpoint's tensors do not match ``template`` or its
            metrics disagree with its round.
        """
        where = str(self.path / CHECKPOINT)
        cfg = self.config
        if cfg is not None and ck.config is not None:
            changed = config_differences(ck.config, cfg)
            if changed:
                raise ConfigError(
                    self.option,
                    f"{str(self.path / 'config.toml')!r} no longer describes the run of its "
                    f"checkpoint: changed {'; '.join(changed)}. Only 'rounds' may be raised to "
                    "continue a run; undo the edits, or start a new run with --config",
                )
        if cfg is not None and cfg.rounds < ck.round:
            raise ConfigError(
                self.option,
                f"rounds = {cfg.rounds} in config.toml, but the checkpoint is at round "
                f"{ck.round}; expected rounds >= {ck.round}",
            )
        if len(ck.metrics) != ck.round:
            raise DataError(
                f"checkpoint {where!r} is inconsistent: round {ck.round} but {len(ck.metrics)} "
                "rows of metrics; delete it to restart the run from round 0"
            )
        if template is None:
            return
        missing = sorted(set(template) - set(ck.global_state))
        unexpected = sorted(set(ck.global_state) - set(template))
        wrong = [
            f"{k} {ck.global_state[k].dtype}{list(ck.global_state[k].shape)} "
            f"(expected {v.dtype}{list(v.shape)})"
            for k, v in template.items()
            if k in ck.global_state
            and (ck.global_state[k].shape != v.shape or ck.global_state[k].dtype != v.dtype)
        ]
        if missing or unexpected or wrong:
            parts = [
                f"{label} {', '.join(items)}"
                for label, items in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("mismatched", wrong),
                )
                if items
            ]
            raise DataError(
                f"checkpoint {where!r} does not fit the configured model: {'; '.join(parts)}"
            )

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        with self._writing(self.path / "summary.json"):
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
            with self._writing(self.path / name), atomic_write(self.path / name) as f:
                fig.savefig(f, format="png")
            plt.close(fig)
            paths.append(self.path / name)
        return paths
