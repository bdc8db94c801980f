"""Build the Flower app that docs/flower.md shows, from the page's own code blocks.

A block belongs to the app when its first line is ``# <path>`` with a path of
the app (``pyproject.toml`` or ``myapp/...``); the file is written verbatim.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "flower.md"
_BLOCK = re.compile(r"^```[a-z]*\n# (pyproject\.toml|myapp/[\w./]+)\n(.*?)^```", re.S | re.M)


def docs_app_files(doc: Path = DOC) -> dict[str, str]:
    """``path -> text`` of every app file the page shows (the path line removed)."""
    files = {m.group(1): m.group(2) for m in _BLOCK.finditer(doc.read_text())}
    return files


def write_docs_app(dest: Path, doc: Path = DOC) -> list[Path]:
    """Write the page's app under ``dest``; returns the files written."""
    written = []
    for rel, text in docs_app_files(doc).items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
