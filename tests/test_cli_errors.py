"""Every user error of ``fedquant run``/``fuzz`` is one line and exit 2; resume refuses a changed run.

The runs use a tiny image folder (8x8 grey images, 24 train / 8 test), so each
takes a second or two.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from fedquant.cli import main


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for i in range(n):
            cls = ("a", "b")[i % 2]
            img = rng.integers(0, 64, (8, 8), np.uint8) + (150 if cls == "b" else 0)
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            (root / split / cls / f"{i:03d}.png").write_bytes(_png(img.astype(np.uint8)))
    return root


def _args(tiny: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--dataset",
        "imagefolder",
        "--data-root",
        str(tiny),
        "--cache-dir",
        str(out / "cache"),
        "--num-clients",
        "2",
        "--rounds",
        "1",
        "--quiet",
        "--out",
        str(out / "runs"),
        *extra,
    ]


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, err
    return err


def _run_dir(out: Path) -> Path:
    (run,) = (p for p in (out / "runs").iterdir() if not p.name.startswith("."))
    return run


# ------------------------------------------------------------------ config and flags


def test_config_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--config", str(tmp_path)])
    _one_line_error(capsys, code, f"--config: {str(tmp_path)!r} is a directory")


def test_config_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.toml"
    p.write_bytes(b"seed = 1\n# caf\xe9\n")
    code = main(["run", "--config", str(p)])
    _one_line_error(capsys, code, "is not UTF-8 text (byte 14)")


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--config", "--config: is empty; expected the path of a TOML file"),
        ("--resume", "--resume: is empty; expected a results directory"),
    ],
)
def test_empty_config_or_resume(
    flag: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _one_line_error(capsys, main(["run", flag, ""]), message)


def test_model_that_is_not_a_factory(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_args(tiny, tmp_path, "--model", "os:sep"))
    _one_line_error(capsys, code, "model: 'os:sep' is a str, not a factory")


def test_out_under_a_regular_file(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "runs").write_text("a file")
    code = main(_args(tiny, tmp_path))
    _one_line_error(capsys, code, "--out: ", "runs' is a file, not a directory")
    args = _args(tiny, tmp_path)
    args[args.index("--out") + 1] = str(tmp_path / "runs" / "sub")
    code = main(args)
    _one_line_error(capsys, code, "--out: cannot write", "Not a directory")


def test_out_on_a_read_only_file_system(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # simulated: the run directory's mkdir fails as it does on a read-only mount
    real_mkdir = os.mkdir

    def mkdir(path: object, *a: object, **k: object) -> None:
        if str(tmp_path / "runs") in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        real_mkdir(path, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", mkdir)
    code = main(_args(tiny, tmp_path))
    _one_line_error(capsys, code, "--out: cannot write", "Read-only file system")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("fail_from", [1, 4])
def test_out_on_a_full_file_system(
    fail_from: int,
    tiny: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # simulated ENOSPC from fsync: at the first file (config.toml) or at the first
    # checkpoint (after config.toml, meta.json, clients.json)
    import fedquant.fl.files as files

    calls = [0]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if "/runs/" in os.readlink(f"/proc/self/fd/{fd}"):
            calls[0] += 1
        if calls[0] >= fail_from:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    code = main(_args(tiny, tmp_path))
    name = "runs'" if fail_from == 1 else "checkpoint.npz"
    _one_line_error(capsys, code, "--out: cannot write", name, "No space left on device")
    left = list((tmp_path / "runs").iterdir())
    if fail_from == 1:  # the start failed: no run directory, no staging folder
        assert left == []
    else:  # the start files are whole, no temporary file remains
        (run,) = left
        assert sorted(p.name for p in run.iterdir()) == ["clients.json", "config.toml", "meta.json"]


def test_fuzz_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    code = main(["fuzz", "--corpus", str(f), "--runs", "1"])
    _one_line_error(capsys, code, f"--corpus: {str(f)!r} is not a directory")
    code = main(["fuzz", "--max-seconds", "-1"])
    _one_line_error(
        capsys, code, "--max-seconds: -1.0 is not valid; expected a number of seconds > 0"
    )
    code = main(["fuzz", "--runs", "-5"])
    _one_line_error(capsys, code, "--runs: -5 is negative")


# ------------------------------------------------------------------ data errors on the CLI


def test_idx_dims_overflowing_int64(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = struct.pack(">II", 0x801, 2) + b"\x00\x01"
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x803, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF) + bytes(64)
    )
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x803, 2, 4, 4) + bytes(32)
    )
    for n in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / n).write_bytes(labels)
    code = main(
        ["run", "--dataset", "mnist", "--data-root", str(tmp_path), "--cache-dir", str(tmp_path)]
    )
    _one_line_error(capsys, code, "train-images-idx3-ubyte: truncated")


def test_huge_png(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (data / "train" / "a" / "000.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    )
    code = main(_args(data, tmp_path))
    _one_line_error(capsys, code, "000.png: image too large to decode safely")


def test_cifar_label_names_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (2, 3072), np.uint8), b"labels": [0, 1]}
        (tmp_path / n).write_bytes(pickle.dumps(d, protocol=2))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"\xff", b"b"]}))
    code = main(
        ["run", "--dataset", "cifar10", "--data-root", str(tmp_path), "--cache-dir", str(tmp_path)]
    )
    _one_line_error(capsys, code, "batches.meta: 'label_names' are not UTF-8 text")


# ------------------------------------------------------------------ training


def test_learning_rate_divergence_names_the_learning_rate(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_args(tiny, tmp_path, "--lr", "1e30", "--rounds", "2"))
    _one_line_error(capsys, code, "local training diverged", "lr=1e+30", "expected a smaller --lr")


def test_clients_with_one_example_train(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 24 examples over 23 clients: 22 clients hold exactly one (BatchNorm cannot
    # train on it: the client skips training and returns the model it got)
    args = _args(tiny, tmp_path)
    args[args.index("--num-clients") + 1] = "23"
    assert main(args) == 0, capsys.readouterr().err
    sizes = json.loads((_run_dir(tmp_path) / "clients.json").read_text())["sizes"]
    assert sizes.count(1) == 22


# ------------------------------------------------------------------ resume


@pytest.fixture
def done_run(tiny: Path, tmp_path: Path) -> Path:
    assert main(_args(tiny, tmp_path, "--seed", "5")) == 0
    return _run_dir(tmp_path)


def _edit(run: Path, key: str, value: str) -> None:
    p = run / "config.toml"
    lines = [
        f"{key} = {value}" if ln.startswith(f"{key} = ") else ln
        for ln in p.read_text().splitlines()
    ]
    p.write_text("\n".join(lines) + "\n")


def test_run_directory_is_complete_and_paths_are_resolved(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tiny.parent)
    args = _args(tiny, tmp_path)
    args[args.index("--data-root") + 1] = tiny.name  # relative
    old = os.umask(0o027)
    try:
        assert main(args) == 0
    finally:
        os.umask(old)
    run = _run_dir(tmp_path)
    names = {p.name for p in run.iterdir()}
    assert {"config.toml", "meta.json", "clients.json", "checkpoint.npz", "summary.json"} <= names
    assert not [n for n in names if n.startswith(".")]
    assert f"data_root = {json.dumps(str(tiny.resolve()))}" in (run / "config.toml").read_text()
    for p in run.iterdir():  # the umask's permissions, not mkstemp's 0600
        assert p.stat().st_mode & 0o777 == 0o640, p
    assert run.stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("dataset", '"mnist"', "dataset ('imagefolder' -> 'mnist')"),
        ("seed", "6", "seed (5 -> 6)"),
        ("bits", '"8"', "bits ('4-2-2-4' -> '8')"),
        ("num_clients", "3", "num_clients (2 -> 3)"),
    ],
)
def test_resume_refuses_an_edited_config(
    done_run: Path, key: str, value: str, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit(done_run, key, value)
    code = main(["run", "--resume", str(done_run)])
    _one_line_error(
        capsys,
        code,
        "--resume:",
        "no longer describes the run of its checkpoint",
        field,
        "Only 'rounds' may be raised",
    )


def test_resume_lists_every_changed_field(
    done_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit(done_run, "seed", "6")
    _edit(done_run, "lr", "0.5")
    code = main(["run", "--resume", str(done_run)])
    _one_line_error(capsys, code, "lr (0.01 -> 0.5); seed (5 -> 6)")


def test_resume_may_raise_rounds_not_lower_them(
    done_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a finished run: nothing is rewritten (wall_seconds stays what it was)
    summary = (done_run / "summary.json").read_text()
    assert main(["run", "--resume", str(done_run), "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (done_run / "summary.json").read_text() == summary
    # a stale temporary file of a killed write is removed on resume
    stale = done_run / ".checkpoint.npz.k7x2q9ab.tmp"
    stale.write_bytes(b"half")
    _edit(done_run, "rounds", "2")
    assert main(["run", "--resume", str(done_run), "--quiet"]) == 0, capsys.readouterr().err
    assert not stale.exists()
    rows = (done_run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    wall = json.loads((done_run / "summary.json").read_text())["wall_seconds"]
    first = json.loads(rows[0])["seconds_round"]
    assert wall >= first  # the restored round's time is counted, not only this process's
    _edit(done_run, "rounds", "1")
    code = main(["run", "--resume", str(done_run)])
    _one_line_error(capsys, code, "rounds = 1 in config.toml, but the checkpoint is at round 2")


def test_resume_after_summary_lost_keeps_the_wall_time(
    done_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = json.loads((done_run / "summary.json").read_text())["wall_seconds"]
    (done_run / "summary.json").unlink()
    assert main(["run", "--resume", str(done_run), "--quiet"]) == 0
    after = json.loads((done_run / "summary.json").read_text())["wall_seconds"]
    rounds = [
        json.loads(r)["seconds_round"]
        for r in (done_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert after >= sum(rounds) > 0
    assert after > 0.2 * before  # not ~1e-5


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("empty", "is unreadable (empty file)"),
        ("truncated", "is unreadable (BadZipFile"),
        ("shape", "does not fit the configured model: mismatched conv1.weight"),
        ("missing", "does not fit the configured model: missing bn1.running_var"),
    ],
)
def test_resume_with_a_damaged_checkpoint(
    done_run: Path, damage: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedquant.fl.results import ResultsDir

    ck_path = done_run / "checkpoint.npz"
    _edit(done_run, "rounds", "2")
    if damage == "empty":
        ck_path.write_bytes(b"")
    elif damage == "truncated":
        ck_path.write_bytes(ck_path.read_bytes()[:-100])
    else:
        rd = ResultsDir(done_run)
        rd.read_config()
        ck = rd.read_checkpoint()
        assert ck is not None
        state = dict(ck.global_state)
        if damage == "shape":
            state["conv1.weight"] = np.zeros((3, 3), np.float32)
        else:
            del state["bn1.running_var"]
        rd.write_round(ck.round, state, ck.metrics)
    code = main(["run", "--resume", str(done_run)])
    _one_line_error(capsys, code, "checkpoint.npz", message)


def test_killed_start_leaves_no_run_directory(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fedquant.fl.results as results

    def boom(path: Path, obj: object) -> None:
        if path.name == "clients.json":
            raise KeyboardInterrupt  # as a kill between meta.json and clients.json would
        real(path, obj)

    real = results.write_json
    monkeypatch.setattr(results, "write_json", boom)
    assert main(_args(tiny, tmp_path)) == 130
    assert list((tmp_path / "runs").iterdir()) == []
    # a staging folder a kill -9 left an hour ago is removed by the next start
    monkeypatch.setattr(results, "write_json", real)
    stale = tmp_path / "runs" / ".staging-old-1"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert main(_args(tiny, tmp_path)) == 0
    assert not stale.exists()
    capsys.readouterr()
