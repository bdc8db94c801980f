"""End to end on Flower's deployment engine: a real SuperLink, SuperNodes, ``flwr run``.

Everything runs on 127.0.0.1 with free ports and a temporary ``FLWR_HOME``;
telemetry, update checks and runtime dependency installation are off, so
nothing leaves the machine. Each Flower process is started in its own session
and its whole process group (SuperExec, ClientApp and ServerApp children) is
terminated in the fixtures' ``finally``, also when a test fails. Every
``flwr`` command has a time limit.

* the project's example app with ``QuantizedStrategy(FedAdam)``;
* the app docs/flower.md shows (built from the page), with hostile SuperNodes
  and a SuperNode that picks its own bit width, then with a bits string that
  does not fit its model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from .docs_app import write_docs_app

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

    def run(self, app: Path, overrides: str) -> tuple[str, dict[str, object]]:
        """``flwr run --stream`` (its output) and the run's entry in ``flwr ls``."""
        run = self.flwr(
            "run",
            str(app),
            CONNECTION,
            "--stream",
            "--run-config",
            overrides,
            timeout=RUN_TIMEOUT_S,
        )
        output = run.stdout + run.stderr
        ls = self.flwr("ls", CONNECTION, "--format", "json")
        assert ls.returncode == 0, ls.stdout + ls.stderr
        info = max(json.loads(ls.stdout)["runs"], key=lambda r: r["pending-at"])
        return output, info


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


@contextmanager
def _federation(tmp_path: Path, node_configs: list[str]) -> Iterator[Federation]:
    """A SuperLink and one SuperNode per node config on 127.0.0.1; all stopped at the end."""
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
        # one thread per ClientApp: several of them share the CI machine's cores
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
        for i, node_config in enumerate(node_configs):
            start(
                f"supernode-{i}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(_free_port()),
                "--node-config",
                node_config,
            )
        yield Federation(env=env, workdir=tmp_path, logs=logs)
    finally:
        _stop(procs)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    """The example app's federation: two SuperNodes, one IID partition each."""
    configs = [f"partition-id={i} num-partitions={NUM_NODES}" for i in range(NUM_NODES)]
    with _federation(tmp_path, configs) as fed:
        yield fed


def test_fedadam_wrapped_two_rounds_at_two_bits_on_the_deployment_engine(
    federation: Federation, tmp_path: Path
) -> None:
    """Acceptance (a): QuantizedStrategy(FedAdam), 2 SuperNodes, 2 rounds, accuracy improving."""
    results = tmp_path / "results.json"
    overrides = (
        f'num-server-rounds={ROUNDS} bits="2" aggregation="inverse-mse" strategy="fedadam" '
        f'fraction-evaluate=0.0 min-nodes={NUM_NODES} results-path="{results}"'
    )
    start = time.monotonic()
    output, info = federation.run(APP, overrides)
    elapsed = time.monotonic() - start
    assert info["status"] == "finished:completed", (
        f"{info}\n{output[-4000:]}\n{federation.logs_tail()}"
    )
    report = json.loads(results.read_text())
    assert report["strategy"] == "fedadam" and "FedAdam" in output

    # learning happened: from chance (~10 %) to well above it in 2 rounds of 2-bit uploads
    # (FedAdam's first steps are sign-like, eta = server-lr per weight: slower than FedAvg)
    acc = {int(r): m["accuracy"] for r, m in report["central"].items()}
    assert sorted(acc) == list(range(ROUNDS + 1))
    assert acc[ROUNDS] > acc[0] + 0.1 and acc[ROUNDS] > acc[1], acc
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
        f"\nflwr run: {elapsed:.1f} s; accuracy {acc}; uplink: Flower {inbound} B, codec {payload} B, "
        f"float32 {float32_total} B; downlink: Flower {outbound} B, records {downlink} B"
    )


# --------------------------------------------------------------------------- the docs' own app

#: node configs: honest; honest with its own width; plain float replies with a NaN;
#: payload replies without the fedquant.mse.* metric entries
OWN_NODES = [
    "partition-id=0",
    'partition-id=1 fedquant-bits="2"',
    'partition-id=2 hostile="nan"',
    'partition-id=3 hostile="no-mse"',
]


@pytest.fixture(scope="module")
def own_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Federation, Path]]:
    """The app of docs/flower.md, with the hostile mod in front of fedquant_mod."""
    root = tmp_path_factory.mktemp("own-app")
    app = root / "app"
    write_docs_app(app)
    shutil.copy(Path(__file__).with_name("hostile_mod.py"), app / "myapp" / "hostile.py")
    client = app / "myapp" / "client_app.py"
    text = client.read_text()
    assert "app = ClientApp(mods=[fedquant_mod])" in text
    assert "from fedquant.flower import fedquant_mod\n" in text
    text = text.replace("mods=[fedquant_mod]", "mods=[hostile_mod, fedquant_mod]")
    text = text.replace(
        "from fedquant.flower import fedquant_mod\n",
        "from fedquant.flower import fedquant_mod\nfrom myapp.hostile import hostile_mod\n",
    )
    client.write_text(text)
    with _federation(root, OWN_NODES) as fed:
        yield fed, app


def _accuracies(output: str) -> list[float]:
    """The central accuracies Flower's round loop logs, round 0 first."""
    return [float(a) for a in re.findall(r"'accuracy': ([0-9.e-]+)", output)]


def test_own_app_from_the_docs_with_hostile_nodes(own_app: tuple[Federation, Path]) -> None:
    """Acceptance (b) and the docs' app: the run completes, bad replies are named."""
    fed, app = own_app
    output, info = fed.run(app, 'num-server-rounds=1 bits="4" min-nodes=4')
    assert info["status"] == "finished:completed", f"{info}\n{output[-4000:]}\n{fed.logs_tail()}"
    assert "is fedquant_mod in the ClientApp's mods?" in output, output[-4000:]
    assert "fedquant.mse.* entries do not match the payload" in output, output[-4000:]
    # the two honest nodes admitted, the two hostile ones rejected, payloads of
    # 2 and 4 bits aggregated together (one round: the app learns in one)
    assert output.count("'fedquant.clients': 2") == 1, output[-4000:]
    assert output.count("'fedquant.rejected': 2") == 1
    assert output.count("'fedquant.bits-min': 2") == 1
    assert output.count("'fedquant.bits-max': 4") == 1
    acc = _accuracies(output)
    assert len(acc) == 2 and acc[1] > acc[0] + 0.3, acc


def test_own_app_with_bits_that_do_not_fit_fails_before_round_1(
    own_app: tuple[Federation, Path],
) -> None:
    """Acceptance (c): "4-2-2-4" on a 2-layer model stops the run before round 1."""
    fed, app = own_app
    output, info = fed.run(app, 'num-server-rounds=2 bits="4-2-2-4" min-nodes=4')
    assert info["status"] == "finished:failed", f"{info}\n{output[-4000:]}"
    reason = (
        "uplink: bits: '4-2-2-4' gives 4 per-layer widths but the model has 2 quantizable "
        "tensors (hidden.weight, out.weight); give one width per tensor or a single width "
        "(QuantizedStrategy, checked before round 1)"
    )
    assert reason in str(info["status-details"]), info
    assert any(reason in line for line in output.splitlines()), output[-4000:]
    assert "[ROUND 1" not in output, output[-4000:]
