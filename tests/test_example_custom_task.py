"""``examples/custom_task.py`` runs as a user would run it and prints its final metric."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_task.py"


@pytest.mark.slow
def test_custom_task_example_runs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE.parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"final R\^2 (-?\d+\.\d+)", proc.stdout)
    assert m is not None, proc.stdout
    assert float(m.group(1)) > 0.5  # it learned: a constant forecast scores 0
    assert list(tmp_path.iterdir()) == []  # the results went to a temporary directory
