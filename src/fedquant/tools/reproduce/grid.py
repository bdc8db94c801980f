"""The named grid of ``fedquant reproduce``: data sets, scales and one-factor-at-a-time cells.

The grid lives in a TOML file (``experiments/paper-claims.toml``) so that it can
be reviewed and extended without reading code. :func:`load_grid` parses and
validates it; :func:`expand` turns one scale of it into :class:`Job` objects,
one per (data set, cell, seed), each carrying a validated
:class:`~fedquant.fl.config.RunConfig`.

A job's RunConfig is built in this order, later keys winning::

    [defaults] -> [scales.<scale>] -> [datasets.<name>] -> the cell's changes -> seed

``bits = "paper"`` stands for the data set's ``paper_bits``. The keys
``seeds``, ``samples_per_client``, ``test_samples``, ``final_on_subset`` and ``subset_seed`` of a
scale, and ``label`` and ``datasets`` (the data sets it runs on; default all)
of a cell, belong to the grid; every other key must be a
``fedquant run`` option.

Each job has a *fingerprint*: a hash of the settings the grid states (not of
every RunConfig default, so that adding an option to RunConfig later does not
invalidate finished runs) plus the data subset. A finished run whose recorded
fingerprint differs from the grid's is stale: the report ignores it and
``fedquant reproduce`` runs it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedquant.errors import ConfigError
from fedquant.fl.config import FIELDS, RunConfig
from fedquant.fl.results import read_toml
from fedquant.tools.reproduce.stats import Hypothesis

__all__ = [
    "ENV_FIELDS",
    "Cell",
    "ClaimTests",
    "DatasetEntry",
    "Grid",
    "Job",
    "Scale",
    "default_grid_path",
    "expand",
    "load_grid",
]

#: RunConfig fields that say where and how fast a run goes, not what it computes:
#: they may differ between machines and are left out of fingerprints.
ENV_FIELDS = ("device", "threads", "out", "data_root", "cache_dir")
#: keys of a scale table that are not RunConfig options.
_SCALE_KEYS = (
    "seeds",
    "samples_per_client",
    "test_samples",
    "subset_seed",
    "final_on_subset",
    "cells",
)
#: the placeholder for a data set's paper bits.
PAPER_BITS = "paper"
#: the grid file, relative to the repository root (or the working directory).
GRID_FILE = Path("experiments") / "paper-claims.toml"


@dataclass(frozen=True)
class DatasetEntry:
    """One data set of the grid.

    Attributes
    ----------
    name : str
        The ``--dataset`` name, e.g. ``"cifar10-jpeg"``.
    title : str
        How figures and tables name it.
    paper_bits : str
        The paper's per-layer bits for it (what ``bits = "paper"`` means).
    data_root : str or None
        Its files, relative to ``--data-dir`` (``None`` for ``mnist-embedded``).
    """

    name: str
    title: str
    paper_bits: str
    data_root: str | None = None


@dataclass(frozen=True)
class Scale:
    """How big the runs of the grid are.

    Attributes
    ----------
    name : str
    seeds : tuple of int
        One run per seed for every (data set, cell).
    samples_per_client : int
        Train on a fixed class-stratified subset of ``num_clients x`` this many
        training images (0 = the whole training split).
    test_samples : int
        Evaluate each round on a fixed stratified subset of this many test
        images (0 = the whole test split); the final accuracy always uses the
        whole test split.
    subset_seed : int
        Seed of both subsets (the same for every cell and seed, so that cells
        are compared on the same images).
    settings : mapping
        RunConfig options of this scale (``num_clients``, ``rounds``, ...).
    final_on_subset : bool
        Take the final accuracy on the ``test_samples`` subset too, instead of
        the whole test split (for grids too large to evaluate every run on it).
    cells : tuple of str or None
        The cells this scale runs (``None``: every cell of the grid); ``--cells``
        still selects among all of them.
    """

    name: str
    seeds: tuple[int, ...]
    samples_per_client: int
    test_samples: int
    subset_seed: int
    settings: Mapping[str, Any]
    final_on_subset: bool = False
    cells: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Cell:
    """A named configuration: the changes from the grid's defaults."""

    name: str
    changes: Mapping[str, Any]
    label: str
    #: the data sets it runs on (``None`` = every data set of the grid)
    datasets: tuple[str, ...] | None = None

    def describe(self) -> str:
        """The changes as ``key=value`` pairs (``"defaults"`` if none)."""
        if not self.changes:
            return "defaults"
        return ", ".join(f"{k}={v}" for k, v in self.changes.items())


@dataclass(frozen=True)
class ClaimTests:
    """The ``[claims]`` table: how each claim is tested, fixed before the runs.

    Attributes
    ----------
    alpha : float
        Family-wise error rate (Holm over every hypothesis of the claims).
    tests : mapping
        Claim key (``"a"``, ...) -> its :class:`~fedquant.tools.reproduce.stats.Hypothesis`.
    extras : mapping
        Claim key -> its other numbers (``min_ratio``, ``claimed_gain``).
    """

    alpha: float
    tests: Mapping[str, Hypothesis]
    extras: Mapping[str, Mapping[str, float]]


def _claim_tests(raw: Mapping[str, Any]) -> ClaimTests:
    alpha = raw.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
        raise ConfigError("claims.alpha", f"{alpha!r} is not a number in (0, 0.5)")
    tests: dict[str, Hypothesis] = {}
    extras: dict[str, dict[str, float]] = {}
    for key, entry in raw.items():
        if key == "alpha":
            continue
        where = f"claims.{key}"
        if not isinstance(entry, Mapping) or "test" not in entry:
            raise ConfigError(where, 'must be a table like { test = "equivalence", margin = 1.0 }')
        for k, v in entry.items():
            if k not in ("test", "margin", "min_ratio", "claimed_gain"):
                raise ConfigError(
                    f"{where}.{k}", "unknown key; expected test, margin, min_ratio, claimed_gain"
                )
            if k != "test" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{where}.{k}", f"{v!r} is not a number")
        try:
            tests[str(key)] = Hypothesis(str(entry["test"]), float(entry.get("margin", 0.0)))
        except ConfigError as e:
            raise e.renamed(f"{where}.{e.option}") from e
        extras[str(key)] = {k: float(v) for k, v in entry.items() if k not in ("test", "margin")}
    return ClaimTests(float(alpha), tests, extras)


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    path: Path
    defaults: Mapping[str, Any]
    datasets: tuple[DatasetEntry, ...]
    scales: Mapping[str, Scale]
    cells: tuple[Cell, ...]
    #: the pre-registered tests of the claims (the ``[claims]`` table; empty = none)
    claims: ClaimTests | None = None

    def dataset(self, name: str) -> DatasetEntry:
        for d in self.datasets:
            if d.name == name:
                return d
        raise ConfigError(
            "--datasets", f"{name!r} is not in {self.path}; expected one of: {self._ds_names()}"
        )

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise ConfigError("--cells", f"{name!r} is not a cell of {self.path}")

    def scale(self, name: str) -> Scale:
        try:
            return self.scales[name]
        except KeyError:
            raise ConfigError(
                "--scale",
                f"{name!r} is not in {self.path}; expected one of: {', '.join(self.scales)}",
            ) from None

    def _ds_names(self) -> str:
        return ", ".join(d.name for d in self.datasets)


@dataclass(frozen=True)
class Job:
    """One run of the grid: (scale, data set, cell, seed) and everything needed to run it.

    Attributes
    ----------
    scale, dataset, cell : str
    seed : int
    config : RunConfig
        The validated configuration (``data_root`` already resolved).
    samples_per_client, test_samples, subset_seed : int
        The data subset (see :class:`Scale`).
    settings : mapping
        The settings the grid states for this run (what the fingerprint hashes).
    fingerprint : str
        16 hex digits identifying what the run computes.
    alias_of : str or None
        The earlier cell with identical settings on this data set, if any: then
        this job is not run and its results are that cell's.
    """

    scale: str
    dataset: str
    cell: str
    seed: int
    config: RunConfig
    samples_per_client: int
    test_samples: int
    subset_seed: int
    settings: Mapping[str, Any]
    fingerprint: str
    alias_of: str | None = None
    final_on_subset: bool = False

    @property
    def key(self) -> str:
        """``dataset/cell/seedN``: its directory under the raw-results folder."""
        return f"{self.dataset}/{self.cell}/seed{self.seed}"

    def directory(self, raw_root: Path) -> Path:
        """``raw_root/<dataset>/<cell>/seed<k>``."""
        return Path(raw_root) / self.dataset / self.cell / f"seed{self.seed}"

    def record(self) -> dict[str, Any]:
        """What the run's ``cell.json`` records: the job, its fingerprint and settings."""
        return {
            "scale": self.scale,
            "dataset": self.dataset,
            "cell": self.cell,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "settings": dict(self.settings),
            "samples_per_client": self.samples_per_client,
            "test_samples": self.test_samples,
            "subset_seed": self.subset_seed,
        }


def default_grid_path(grid_file: Path = GRID_FILE) -> Path:
    """``grid_file`` (default ``experiments/paper-claims.toml``) in the working directory,
    else in this source tree."""
    here = Path.cwd() / grid_file
    if here.is_file():
        return here
    tree = Path(__file__).resolve().parents[4] / grid_file  # src/fedquant/tools/reproduce/grid.py
    return tree if tree.is_file() else here


def _table(raw: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a table in {source}")
    return value


def _check_options(values: Mapping[str, Any], where: str, allowed_extra: Sequence[str]) -> None:
    for k in values:
        if k not in FIELDS and k not in allowed_extra:
            extra = f", or one of {', '.join(allowed_extra)}" if allowed_extra else ""
            raise ConfigError(
                f"{where}.{k}", f"unknown key; expected a `fedquant run` option{extra}"
            )


def _int(value: Any, where: str, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(where, f"{value!r} is not valid; expected an integer >= {lo}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(where, f"{value!r} is not valid; expected true or false")
    return value


def _names(value: Any, where: str) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(x, str) for x in value)
        or len(set(value)) != len(value)
    ):
        raise ConfigError(where, f"{value!r} is not valid; expected a non-empty list of cell names")
    return tuple(value)


def load_grid(path: str | os.PathLike[str] | None = None) -> Grid:
    """Read and validate a grid file (default: :func:`default_grid_path`).

    Raises
    ------
    ConfigError
        If the file is missing, is not TOML, or a table or key is invalid; the
        message names the key (e.g. ``cells.bits2.rounding``).
    """
    p = Path(path) if path is not None else default_grid_path()
    if not p.is_file():
        raise ConfigError("--grid", f"{str(p)!r} does not exist; pass --grid FILE")
    raw = read_toml(p)
    src = str(p)
    for k in raw:
        if k not in ("defaults", "datasets", "scales", "cells", "claims"):
            raise ConfigError(
                k, f"unknown table in {src}; expected defaults, datasets, scales, cells, claims"
            )
    defaults = dict(_table(raw, "defaults", src))
    _check_options(defaults, "defaults", ())

    datasets = []
    for name, d in _table(raw, "datasets", src).items():
        if not isinstance(d, Mapping):
            raise ConfigError(f"datasets.{name}", "must be a table")
        for k in d:
            if k not in ("title", "paper_bits", "data_root"):
                raise ConfigError(
                    f"datasets.{name}.{k}", "unknown key; expected title, paper_bits, data_root"
                )
        if "paper_bits" not in d:
            raise ConfigError(f"datasets.{name}.paper_bits", "is required")
        datasets.append(
            DatasetEntry(
                name=str(name),
                title=str(d.get("title", name)),
                paper_bits=str(d["paper_bits"]),
                data_root=None if d.get("data_root") is None else str(d["data_root"]),
            )
        )
    if not datasets:
        raise ConfigError("datasets", f"{src} names no data set")

    scales: dict[str, Scale] = {}
    for name, s in _table(raw, "scales", src).items():
        where = f"scales.{name}"
        if not isinstance(s, Mapping):
            raise ConfigError(where, "must be a table")
        _check_options(s, where, _SCALE_KEYS)
        seeds = s.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds:
            raise ConfigError(f"{where}.seeds", f"{seeds!r} is not a non-empty list of integers")
        seeds_t = tuple(_int(x, f"{where}.seeds") for x in seeds)
        if len(set(seeds_t)) != len(seeds_t):
            raise ConfigError(f"{where}.seeds", f"{seeds!r} repeats a seed")
        scales[str(name)] = Scale(
            name=str(name),
            seeds=seeds_t,
            samples_per_client=_int(s.get("samples_per_client", 0), f"{where}.samples_per_client"),
            test_samples=_int(s.get("test_samples", 0), f"{where}.test_samples"),
            subset_seed=_int(s.get("subset_seed", 0), f"{where}.subset_seed"),
            settings={k: v for k, v in s.items() if k not in _SCALE_KEYS},
            final_on_subset=_bool(s.get("final_on_subset", False), f"{where}.final_on_subset"),
            cells=None if "cells" not in s else _names(s["cells"], f"{where}.cells"),
        )
    if not scales:
        raise ConfigError("scales", f"{src} defines no scale")

    cells = []
    for name, c in _table(raw, "cells", src).items():
        where = f"cells.{name}"
        if not isinstance(c, Mapping):
            raise ConfigError(where, 'must be a table, e.g. { bits = "2" }')
        _check_options(c, where, ("label", "datasets"))
        changes = {k: v for k, v in c.items() if k not in ("label", "datasets")}
        for k in ("seed", *ENV_FIELDS):
            if k in changes:
                raise ConfigError(f"{where}.{k}", "is set by the scale or the command, not a cell")
        only: tuple[str, ...] | None = None
        if "datasets" in c:
            known = [d.name for d in datasets]
            only = tuple(str(x) for x in c["datasets"]) if isinstance(c["datasets"], list) else ()
            bad = [x for x in only if x not in known]
            if not only or bad:
                raise ConfigError(
                    f"{where}.datasets",
                    f"{c['datasets']!r} is not a non-empty list of the grid's data sets "
                    f"({', '.join(known)})",
                )
        cells.append(
            Cell(name=str(name), changes=changes, label=str(c.get("label", name)), datasets=only)
        )
    if not cells:
        raise ConfigError("cells", f"{src} defines no cell")
    known_cells = [c.name for c in cells]
    for sc in scales.values():
        unknown = [n for n in sc.cells or () if n not in known_cells]
        if unknown:
            raise ConfigError(
                f"scales.{sc.name}.cells",
                f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a cell of "
                f"{src}; expected names from [cells]",
            )
    return Grid(
        path=p,
        defaults=defaults,
        datasets=tuple(datasets),
        scales=scales,
        cells=tuple(cells),
        claims=_claim_tests(_table(raw, "claims", src)) if "claims" in raw else None,
    )


def _fingerprint(settings: Mapping[str, Any]) -> str:
    blob = json.dumps(dict(sorted(settings.items())), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cell_settings(
    grid: Grid, scale: Scale, dataset: DatasetEntry, cell: Cell, seed: int
) -> dict[str, Any]:
    """The settings the grid states for one run (RunConfig options, without ENV_FIELDS)."""
    values: dict[str, Any] = {}
    values.update(grid.defaults)
    values.update(scale.settings)
    values["dataset"] = dataset.name
    values.update(cell.changes)
    if values.get("bits", PAPER_BITS) == PAPER_BITS:
        values["bits"] = dataset.paper_bits
    values["seed"] = seed
    return {k: v for k, v in values.items() if k not in ENV_FIELDS}


def expand(
    grid: Grid,
    scale_name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    datasets: Sequence[str] | None = None,
    cells: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[Job]:
    """The jobs of one scale, every RunConfig validated, in run order.

    Parameters
    ----------
    grid : Grid
    scale_name : str
    data_dir : path, optional
        Where the data sets' ``data_root`` are resolved (default: the working
        directory).
    datasets, cells : sequence of str, optional
        Restrict to these data sets / cell names (default: all data sets; the
        scale's ``cells``, else all).
    seeds : sequence of int, optional
        Instead of the scale's seeds.
    overrides : mapping, optional
        ENV_FIELDS options for every job (``device``, ``threads``, ...).

    Returns
    -------
    list of Job
        Ordered seed first, then data set, then cell, so that an interrupted
        grid has every cell of the first seeds rather than every seed of the
        first cells. Alias jobs (see :class:`Job`) are included.

    Raises
    ------
    ConfigError
        If a name is unknown or a cell's configuration is invalid; the message
        names the data set and the cell.
    """
    scale = grid.scale(scale_name)
    env = dict(overrides or {})
    for k in env:
        if k not in ENV_FIELDS:
            raise ConfigError(k, f"only {', '.join(ENV_FIELDS)} can be overridden for a whole grid")
    scale_env = {k: v for k, v in scale.settings.items() if k in ENV_FIELDS}
    ds_list = [grid.dataset(n) for n in datasets] if datasets else list(grid.datasets)
    names = cells or scale.cells
    cell_list = [grid.cell(n) for n in names] if names else list(grid.cells)
    seed_list = tuple(seeds) if seeds else scale.seeds
    base_dir = Path(data_dir) if data_dir is not None else Path.cwd()

    jobs: list[Job] = []
    for seed in seed_list:
        for ds in ds_list:
            seen: dict[str, str] = {}  # fingerprint (one seed here) -> first cell
            for cell in grid.cells:  # aliases are decided on the full grid, not the filter
                settings = cell_settings(grid, scale, ds, cell, seed)
                fp = _fingerprint(
                    {
                        **settings,
                        "samples_per_client": scale.samples_per_client,
                        "test_samples": scale.test_samples,
                        "subset_seed": scale.subset_seed,
                        # only when set, so that older runs keep their fingerprints
                        **({"final_on_subset": True} if scale.final_on_subset else {}),
                    }
                )
                alias = seen.setdefault(fp, cell.name)
                if cell not in cell_list or (
                    cell.datasets is not None and ds.name not in cell.datasets
                ):
                    continue
                values = {**settings, **scale_env, **env}
                if ds.data_root is not None:
                    values["data_root"] = str(base_dir / ds.data_root)
                try:
                    cfg = RunConfig(**values)
                except ConfigError as e:
                    raise ConfigError(
                        f"{grid.path.name}: {ds.name}/{cell.name}: {e.option}",
                        e.detail,
                    ) from e
                except TypeError as e:  # pragma: no cover - guarded by _check_options
                    raise ConfigError(f"{ds.name}/{cell.name}", str(e)) from e
                jobs.append(
                    Job(
                        scale=scale.name,
                        dataset=ds.name,
                        cell=cell.name,
                        seed=seed,
                        config=cfg,
                        samples_per_client=scale.samples_per_client,
                        test_samples=scale.test_samples,
                        subset_seed=scale.subset_seed,
                        settings=settings,
                        fingerprint=fp,
                        alias_of=None if alias == cell.name else alias,
                        final_on_subset=scale.final_on_subset,
                    )
                )
    return jobs
