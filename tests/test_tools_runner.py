"""The experiment runner: skip by fingerprint, rerun outdated, failures, processes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedquant.errors import FedquantError
from fedquant.tools import runner
from fedquant.tools.runner import JobResult, Outcome, job_status, run_job, run_jobs


@dataclass(frozen=True)
class FakeJob:
    key: str
    fingerprint: str = "f1"
    alias_of: str | None = None
    config: Any = field(default_factory=lambda: SimpleNamespace(threads=1, device="cpu"))

    def directory(self, raw_root: Path) -> Path:
        return Path(raw_root) / self.key

    def record(self) -> dict[str, Any]:
        return {"key": self.key, "fingerprint": self.fingerprint}


CALLS: list[str] = []


def _execute(job: FakeJob, d: Path) -> Outcome:
    CALLS.append(job.key)
    if job.key == "bad":
        raise ValueError("boom")
    return Outcome({"final_accuracy": 0.5, "n": len(CALLS)}, resumed_from=0)


def test_runs_then_skips_then_reruns_changed_settings(tmp_path: Path) -> None:
    CALLS.clear()
    job = FakeJob("a")
    r = run_job(job, tmp_path, _execute)
    assert r.status == "done" and r.final_accuracy == 0.5 and r.resumed_from == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["source_sha256"] == runner.source_fingerprint()
    assert summary["threads"] == 1 and summary["wall_seconds"] >= 0 and summary["n"] == 1
    assert json.loads((tmp_path / "a" / "cell.json").read_text())["fingerprint"] == "f1"
    assert run_job(job, tmp_path, _execute).status == "skipped" and CALLS == ["a"]
    changed = FakeJob("a", fingerprint="f2")
    assert job_status(changed, tmp_path) == "stale"
    assert run_job(changed, tmp_path, _execute).status == "done" and CALLS == ["a", "a"]


def test_outdated_runs_are_rerun_only_when_asked(tmp_path: Path) -> None:
    CALLS.clear()
    job = FakeJob("a")
    run_job(job, tmp_path, _execute)
    p = tmp_path / "a" / "summary.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "source_sha256": "other"}))
    assert job_status(job, tmp_path, runner.source_fingerprint()) == "outdated"
    assert run_job(job, tmp_path, _execute).status == "skipped"
    assert run_jobs([job], tmp_path, _execute, in_process=True, rerun_outdated=False) == []
    (r,) = run_jobs([job], tmp_path, _execute, in_process=True, argv=["cmd"])
    assert r.status == "done" and CALLS == ["a", "a"]
    (rec,) = runner.read_invocations(tmp_path)
    assert rec["argv"] == ["cmd"] and rec["results"] == {"done": 1} and rec["status"] == "finished"
    assert "pythonpath" not in rec and rec["environment"]["python"]


def test_a_failing_run_is_reported_not_raised(tmp_path: Path) -> None:
    results = run_jobs(
        [FakeJob("bad"), FakeJob("b", alias_of="a")], tmp_path, _execute, in_process=True
    )
    assert [(r.key, r.status) for r in results] == [("bad", "failed")]
    assert results[0].error == "ValueError: boom"
    assert "ValueError: boom" in (tmp_path / "bad" / "error.txt").read_text()
    assert job_status(FakeJob("bad"), tmp_path) == "missing"


def test_busy_when_another_live_process_holds_the_lock(tmp_path: Path) -> None:
    import os
    import socket

    d = tmp_path / "a"
    d.mkdir()
    (d / runner.LOCK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    assert run_job(FakeJob("a"), tmp_path, _execute) == JobResult("a", "busy")
    (d / runner.LOCK).write_text(f"{socket.gethostname()} 999999999\n")  # a dead process
    assert run_job(FakeJob("a"), tmp_path, _execute).status == "done"


def test_run_in_processes_delivers_results_and_exceptions() -> None:
    import math

    seen: dict[int, Any] = {}
    runner.run_in_processes(
        math.factorial, [3, 5, -1], workers=2, threads=1, on_done=seen.__setitem__
    )
    assert seen[3] == 6 and seen[5] == 120
    assert isinstance(seen[-1], ValueError)


def test_call_in_fresh_process() -> None:
    out, _ = runner.call_in_fresh_process(
        "json:dumps", {"obj": [1, 2]}, timeout_s=60, failed="dumps failed"
    )
    assert out == "[1, 2]"
    with pytest.raises(FedquantError, match=r"(?s)loads failed: .*JSONDecodeError"):
        runner.call_in_fresh_process("json:loads", {"s": "{"}, timeout_s=60, failed="loads failed")
