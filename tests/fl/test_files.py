"""Crash-safe writing: umask permissions, stale temporary files, and the config comparison."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedquant.fl.config import RunConfig, config_differences
from fedquant.fl.files import atomic_write, remove_stale_temps


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_honours_the_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        with atomic_write(tmp_path / "f.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "f", "w") as f:
        f.write("new")
        raise RuntimeError
    assert (tmp_path / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_remove_stale_temps_touches_only_temporary_files(tmp_path: Path) -> None:
    keep = [".hidden", "a.tmp", ".x.tmp", "checkpoint.npz", ".checkpoint.npz.ab.tmp"]
    stale = [".checkpoint.npz.k7x2q9ab.tmp", ".metrics.jsonl.a_b1c2d3.tmp"]
    for n in keep + stale:
        (tmp_path / n).write_text("x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_config_differences_ignore_operational_fields_and_rounds() -> None:
    cfg = RunConfig()
    recorded = cfg.to_dict()
    moved = cfg.with_(out="elsewhere", data_root="/data", threads=2, device="cpu", rounds=99)
    assert config_differences(recorded, moved) == []
    changed = cfg.with_(seed=3, alpha=0.1, aggregation="mean")
    assert config_differences(recorded, changed) == [
        "alpha (0.5 -> 0.1)",
        "aggregation ('inverse-mse' -> 'mean')",
        "seed (0 -> 3)",
    ]
    # a field an older checkpoint lacks counts as its default
    del recorded["seed"]
    assert config_differences(recorded, cfg) == []
    assert config_differences(recorded, changed)[-1] == "seed (0 -> 3)"
