"""The package's layers: each imports only the layers below it.

    base (errors, choices, argparsing, optional) <- quant <- fl <- facade <- flower
    <- tools <- cli

Imports inside functions count too: a lazy import of a higher layer is still a cycle
in waiting. The facade is the package's ``__init__``: the public names over quant and fl.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedquant"
RANK = {"base": 0, "quant": 1, "fl": 2, "facade": 2.5, "flower": 3, "tools": 4, "cli": 5}
BASE = {"errors", "choices", "argparsing", "optional"}


def layer_of(dotted: str) -> str:
    """The layer of the module ``fedquant.<dotted>`` (``""`` for the facade)."""
    head = dotted.split(".", 1)[0]
    if head in BASE:
        return "base"
    if head == "":
        return "facade"
    if head not in RANK or head == "facade":
        raise AssertionError(f"fedquant.{dotted} belongs to no layer; add it to {RANK}")
    return head


def _is_module(name: str) -> bool:
    return (SRC / f"{name}.py").is_file() or (SRC / name / "__init__.py").is_file()


def imported(tree: ast.AST, module: str) -> set[str]:
    """Every fedquant module ``tree`` imports, relative to the package, anywhere in it."""
    out: set[str] = set()
    package = module.rsplit(".", 1)[0] if "." in module else ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name[9:] for a in node.names if a.name.startswith("fedquant.")}
            out |= {"" for a in node.names if a.name == "fedquant"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                name = f"{base}.{node.module}" if node.module else base
                out.add(name.strip("."))
            elif node.module == "fedquant":  # a submodule, or a name of the facade
                out |= {a.name if _is_module(a.name) else "" for a in node.names}
            elif node.module and node.module.startswith("fedquant."):
                out.add(node.module[9:])
    return out


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        found.append((".".join(parts), path))
    return found


@pytest.mark.parametrize(("module", "path"), modules(), ids=lambda v: str(v))
def test_imports_only_layers_below(module: str, path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mine = layer_of(module)
    for target in sorted(imported(tree, module)):
        theirs = layer_of(target)
        assert RANK[theirs] <= RANK[mine], (
            f"fedquant.{module} ({mine}) imports fedquant.{target} ({theirs}), a layer above it"
        )


def test_checker_sees_a_violation() -> None:
    tree = ast.parse("def f():\n    from fedquant.tools.bench import cli\n")
    assert imported(tree, "quant.codec") == {"tools.bench"}
    assert RANK[layer_of("tools.bench")] > RANK[layer_of("quant.codec")]
