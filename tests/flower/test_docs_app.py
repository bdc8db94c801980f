"""The app docs/flower.md shows, built from the page and driven in-process (no SuperLink).

The slow integration test runs the same files on a real SuperLink; this one
checks quickly that they import, learn, and talk to the wrapper as the page says.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedquant.errors import ConfigError
from fedquant.flower import QuantizedStrategy

from .conftest import FakeGrid, context
from .docs_app import docs_app_files, write_docs_app


@pytest.fixture
def docs_app(tmp_path: Path) -> Iterator[dict[str, ModuleType]]:
    write_docs_app(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        yield {
            name: importlib.import_module(f"myapp.{name}")
            for name in ("task", "client_app", "server_app")
        }
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "myapp" or m.startswith("myapp.")]:
            del sys.modules[name]


def test_the_page_shows_a_whole_app() -> None:
    files = docs_app_files()
    assert set(files) == {
        "pyproject.toml",
        "myapp/__init__.py",
        "myapp/task.py",
        "myapp/client_app.py",
        "myapp/server_app.py",
    }
    assert "mods=[fedquant_mod]" in files["myapp/client_app.py"]
    assert "QuantizedStrategy(" in files["myapp/server_app.py"]


def test_the_docs_app_learns_through_the_wrapper(
    docs_app: dict[str, ModuleType], in_run: None
) -> None:
    task, client = docs_app["task"], docs_app["client_app"]
    nodes = [11, 12]
    strategy = QuantizedStrategy(FedAvg(fraction_evaluate=0.0), uplink="4")
    model = task.new_model()
    x_test, y_test = task.load_data(partition=10_000)
    start = task.accuracy(model, x_test, y_test)
    for r in (1, 2):
        arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
        msgs = list(strategy.configure_train(r, arrays, ConfigRecord(), FakeGrid(nodes)))
        replies = [client.app(m, context(nodes.index(m.metadata.dst_node_id))) for m in msgs]
        assert not any(rep.has_error() for rep in replies)
        new, metrics = strategy.aggregate_train(r, replies)
        assert new is not None and metrics is not None and metrics["fedquant.clients"] == 2
        model = {k: a.numpy() for k, a in new.items()}
    # four balanced classes: chance is 0.25; the blobs are well separated
    assert start < 0.4 and task.accuracy(model, x_test, y_test) > start + 0.3


def test_the_docs_model_refuses_four_widths(docs_app: dict[str, ModuleType]) -> None:
    model = docs_app["task"].new_model()
    strategy = QuantizedStrategy(FedAvg(), uplink="4-2-2-4")
    with pytest.raises(ConfigError, match="the model has 2 quantizable tensors"):
        strategy.check_model(ArrayRecord({k: Array(v) for k, v in model.items()}))
