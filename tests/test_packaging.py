"""Packaging: the core (codec, aggregation) runs without the optional dependencies, the
command names the extra to install, and pyproject.toml, constraints.txt and the extras
hint agree with each other."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fedquant.optional import EXTRA_OF_MODULE, install_hint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE_DISTRIBUTIONS = {"numpy", "numba", "llvmlite", "crc32c", "tomli"}

# Runs in a child interpreter: a meta-path finder makes every module outside the standard
# library, fedquant and the core's distributions look absent (ModuleNotFoundError, as when
# it is not installed), then the public API round-trips a tensor.
BLOCKER = """
import importlib.abc, json, sys

ALLOWED = set(sys.stdlib_module_names) | set(json.loads(sys.argv[1]))
ALLOWED |= {m.split(".")[0] for m in sys.modules}  # what the interpreter loaded at start-up

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in ALLOWED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
"""

CORE_ROUND_TRIP = """
import numpy as np
import fedquant

x = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
a = fedquant.encode({"w": x}, seed=0)
b = fedquant.encode({"w": 2 * x}, seed=1)
da, db = fedquant.decode(a), fedquant.decode(b)
result = fedquant.aggregate([a, b], rule="fedavg", num_examples=[1, 3])
q = fedquant.quantize(x, bits=4, seed=0)
print(json.dumps({
    "decoded": da.tensors["w"].tolist(),
    "scale": float(da.info["w"].scales[0]),
    "fedavg_error": float(np.abs(result.tensors["w"] - (da.tensors["w"] + 3 * db.tensors["w"]) / 4).max()),
    "dequantized": fedquant.dequantize(q).tolist(),
    "scale4": float(q.scales[0]),
}))
"""


def _run_blocked(code: str, allowed: set[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, json.dumps(sorted(allowed)), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def _assert_quantized(got: list[list[float]], x: np.ndarray, scale: float, bits: int) -> None:
    """Each value within one grid step of x clipped to [-scale, scale]."""
    assert 0.5 < scale <= 1.0
    step = 2 * scale / (2**bits - 1)
    assert np.abs(np.asarray(got) - np.clip(x, -scale, scale)).max() <= step * (1 + 1e-6)


def test_core_runs_on_numpy_and_numba_alone() -> None:
    out = _run_blocked(CORE_ROUND_TRIP, {"fedquant", *CORE_DISTRIBUTIONS})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    x = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    _assert_quantized(got["decoded"], x, got["scale"], 8)
    _assert_quantized(got["dequantized"], x, got["scale4"], 4)
    assert got["fedavg_error"] <= 1e-6


def test_the_blocker_blocks() -> None:
    # the same harness fails when the core needs a module it does not allow
    out = _run_blocked(CORE_ROUND_TRIP, {"fedquant", *CORE_DISTRIBUTIONS} - {"numba"})
    assert out.returncode != 0
    assert "No module named 'numba' (blocked)" in out.stderr


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["run", "--rounds", "1", "--quiet"], "torch"),
        (["compare", "nowhere"], "rich"),
        (["bench", "--only", "speed"], "torch"),
    ],
)
def test_command_without_the_sim_extra_names_it(argv: list[str], module: str) -> None:
    # everything installed except the sim extra's own modules
    code = "from fedquant.cli import main\nsys.exit(main(sys.argv[2:]))\n"
    allowed = {m.split(".")[0] for m in sys.modules} | set(packages_distributions())
    allowed -= {m for m, extra in EXTRA_OF_MODULE.items() if extra == "sim"}
    out = _run_blocked(code, allowed, *argv)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"fedquant {argv[0]}: error: {module} is not installed; "
        "install the sim extra: pip install 'fedquant[sim]'"
    ]


def test_install_hint_only_for_missing_optional_packages() -> None:
    assert install_hint(ModuleNotFoundError("x", name="flwr")) == (
        "flwr is not installed; install the flower extra: pip install 'fedquant[flower]'"
    )
    assert install_hint(ModuleNotFoundError("x", name="numpy")) is None  # core: a broken install
    assert install_hint(ModuleNotFoundError("x", name="torch.nn.missing")) is None  # torch is there
    assert install_hint(ModuleNotFoundError("x")) is None


def _requirements(extra: str | None) -> list[Requirement]:
    """The requirements of the core (None) or of one extra, self-references expanded."""
    project = PYPROJECT["project"]
    raw = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    out: list[Requirement] = []
    for line in raw:
        req = Requirement(line)
        if canonicalize_name(req.name) == "fedquant":
            for sub in sorted(req.extras):
                out += _requirements(sub)
        else:
            out.append(req)
    return out


def _provided(extra: str) -> set[str]:
    """Distributions an extra installs: its requirements and their requested extras."""
    names = set()
    for req in _requirements(extra):
        names.add(canonicalize_name(req.name))
        for dep in requires(req.name) or []:
            dep_req = Requirement(dep)
            marker = dep_req.marker
            if marker and any(marker.evaluate({"extra": e}) for e in req.extras):
                names.add(canonicalize_name(dep_req.name))
    return names


def test_each_hinted_extra_installs_its_module() -> None:
    dists = packages_distributions()
    for module, extra in EXTRA_OF_MODULE.items():
        (dist,) = {canonicalize_name(d) for d in dists[module]}
        assert dist in _provided(extra), (module, extra)


def test_core_requires_none_of_the_optional_packages() -> None:
    dists = packages_distributions()
    optional = {canonicalize_name(d) for m in EXTRA_OF_MODULE for d in dists[m]}
    core = {canonicalize_name(r.name) for r in _requirements(None)}
    assert core <= CORE_DISTRIBUTIONS
    assert not core & optional


def test_every_requirement_is_pinned_in_constraints() -> None:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pin = Requirement(line)
            (spec,) = pin.specifier
            assert spec.operator == "==", line
            if pin.marker is None or pin.marker.evaluate():
                assert canonicalize_name(pin.name) not in pins, f"two pins apply: {line}"
                pins[canonicalize_name(pin.name)] = spec.version
    for extra in [None, *PYPROJECT["project"]["optional-dependencies"]]:
        for req in _requirements(extra):
            if req.marker is not None and not req.marker.evaluate():
                continue
            name = canonicalize_name(req.name)
            assert name in pins, f"{req.name} (extra {extra}) has no pin in constraints.txt"
            assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


def test_docstring_rules_cover_the_modules_of_the_public_names() -> None:
    import fedquant

    ignores = PYPROJECT["tool"]["ruff"]["lint"]["per-file-ignores"]
    (pattern,) = (k for k, v in ignores.items() if k.startswith("!") and v == ["D"])
    prefix, braces, suffix = re.fullmatch(r"!(.*)\{(.*)\}(.*)", pattern).groups()  # type: ignore[union-attr]
    checked = {f"{prefix}{stem}{suffix}" for stem in braces.split(",")}
    public = {"src/fedquant/__init__.py"}
    for name in fedquant.__all__:
        module = getattr(fedquant, name).__module__ if name != "__version__" else "fedquant"
        if module != "fedquant":
            public.add("src/" + module.replace(".", "/") + ".py")
    assert checked == public


@pytest.mark.slow
def test_fresh_venv_installs_the_core_without_torch(tmp_path: Path) -> None:
    """``pip install fedquant`` (no extras) from PyPI into a new virtual environment."""
    src = tmp_path / "fedquant"  # a copy: building in place would write into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "-c", str(ROOT / "constraints.txt"), str(src)],
        check=True,
        capture_output=True,
        timeout=900,
    )

    one_liner = (
        "import fedquant; print(fedquant.decode(fedquant.encode("
        "{'w': __import__('numpy').ones((4,4),'f4')}, seed=0)).tensors['w'].sum())"
    )
    out = subprocess.run([python, "-c", one_liner], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "16.0"
    for module in EXTRA_OF_MODULE:
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
        assert f"No module named '{module}'" in probe.stderr
    run = subprocess.run([str(venv / "bin" / "fedquant"), "run"], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "fedquant run: error: torch is not installed; "
        "install the sim extra: pip install 'fedquant[sim]'"
    ]
    shipped = subprocess.run(
        [python, "-c", "import fedquant, pathlib; print(pathlib.Path(fedquant.__file__).parent)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert (Path(shipped.stdout.strip()) / "py.typed").is_file()
    (licence,) = venv.glob("lib/python*/site-packages/fedquant-*.dist-info/licenses/LICENSE")
    assert "Apache License" in licence.read_text()
