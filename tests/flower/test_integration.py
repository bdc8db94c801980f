"""End to end on Flower's deployment engine: a real SuperLink, two SuperNodes, ``flwr run``.

Everything runs on 127.0.0.1 with free ports and a temporary ``FLWR_HOME``;
telemetry, update checks and runtime dependency installation are off, so
nothing leaves the machine. Each Flower process is started in its own session
and its whole process group (SuperExec, ClientApp and ServerApp children) is
terminated in the fixture's ``finally``, also when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("flwr")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "flower"
BIN = Path(sys.executable).parent
CONNECTION = "fedquant-test"
NUM_NODES = 2
ROUNDS = 2
RUN_TIMEOUT_S = 300  # generous for a loaded CI machine; a quiet 2-core machine needs ~40 s


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} unreadable)"
    return f"--- {path.name} ---\n" + "\n".join(lines[-n:])


@dataclass
class Federation:
    env: dict[str, str]
    workdir: Path
    logs: list[Path]

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def logs_tail(self) -> str:
        return "\n".join(_tail(p) for p in self.logs)


def _wait_for_port(port: int, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"a Flower process exited with {p.returncode}\n" + _tail(logs[-1]))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"the SuperLink did not listen on 127.0.0.1:{port} within 30 s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process group, then SIGKILL what is left after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for p in procs:
            try:
                os.killpg(p.pid, sig)  # the group: p and every child it started
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FEDQUANT_CACHE": str(tmp_path / "cache"),
        # one thread per ClientApp: two of them share the CI machine's cores
        "OMP_NUM_THREADS": "1",
        # SuperExec looks for new ServerApp/ClientApp tasks every 1 s by default
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        # SuperLink and SuperNodes start `flower-superexec` / `flwr-*app` from PATH
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def start(name: str, *cmd: str) -> None:
        log = tmp_path / f"{name}.log"
        logs.append(log)
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [str(BIN / cmd[0]), *cmd[1:]],
                    env=env,
                    cwd=tmp_path,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    try:
        start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        )
        _wait_for_port(port, procs, logs)
        for i in range(NUM_NODES):
            start(
                f"supernode-{i}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(_free_port()),
                "--node-config",
                f"partition-id={i} num-partitions={NUM_NODES}",
            )
        yield Federation(env=env, workdir=tmp_path, logs=logs)
    finally:
        _stop(procs)


def test_two_rounds_at_two_bits_on_the_deployment_engine(
    federation: Federation, tmp_path: Path
) -> None:
    results = tmp_path / "results.json"
    overrides = (
        f'num-server-rounds={ROUNDS} bits="2" aggregation="inverse-mse" '
        f'fraction-evaluate=0.0 min-nodes={NUM_NODES} results-path="{results}"'
    )
    start = time.monotonic()
    run = federation.flwr(
        "run", str(APP), CONNECTION, "--stream", "--run-config", overrides, timeout=RUN_TIMEOUT_S
    )
    elapsed = time.monotonic() - start
    assert run.returncode == 0, run.stdout + run.stderr + federation.logs_tail()

    ls = federation.flwr("ls", CONNECTION, "--format", "json")
    assert ls.returncode == 0, ls.stdout + ls.stderr
    (info,) = json.loads(ls.stdout)["runs"]
    assert info["status"] == "finished:completed", (
        f"{info}\n{run.stdout[-4000:]}\n{federation.logs_tail()}"
    )
    report = json.loads(results.read_text())

    # learning happened: from chance (~10 %) to well above it in 2 rounds of 2-bit uploads
    acc = {int(r): m["accuracy"] for r, m in report["central"].items()}
    assert sorted(acc) == list(range(ROUNDS + 1))
    assert acc[ROUNDS] > acc[0] + 0.3, acc

    # the uplink bytes Flower counted are the codec's payloads plus a small per-message
    # envelope (message metadata, object tree, the MetricRecord: measured ~1.7 kB per reply)
    train = report["train"]
    payload = sum(int(train[str(r)]["fedquant.uplink-bytes"]) for r in range(1, ROUNDS + 1))
    replies = sum(int(train[str(r)]["fedquant.clients"]) for r in range(1, ROUNDS + 1))
    assert replies == ROUNDS * NUM_NODES
    inbound = int(info["network-traffic"]["inbound-bytes"])
    assert payload <= inbound <= payload + replies * 4096, (inbound, payload)
    # ... and far below float32 (2-bit weights: the payload is ~13x smaller)
    float32_total = replies * int(report["float32-bytes"])
    assert inbound * 10 < float32_total, (inbound, float32_total)
    # the float32 broadcast is counted the same way on the way out
    downlink = sum(int(train[str(r)]["fedquant.downlink-bytes"]) for r in range(1, ROUNDS + 1))
    outbound = int(info["network-traffic"]["outbound-bytes"])
    assert downlink <= outbound <= downlink * 1.1, (outbound, downlink)

    print(
        f"\nflwr run: {elapsed:.1f} s; uplink: Flower {inbound} B, codec {payload} B, "
        f"float32 {float32_total} B; downlink: Flower {outbound} B, records {downlink} B"
    )
