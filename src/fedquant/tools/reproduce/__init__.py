"""``fedquant reproduce``: which claims of arXiv 2405.13365 hold, measured on real data.

* :mod:`~fedquant.tools.reproduce.grid` reads the named grid
  (``experiments/paper-claims.toml``) and expands a scale into jobs;
* :mod:`~fedquant.tools.reproduce.runner` runs them, resumably, in parallel processes;
* :mod:`~fedquant.tools.reproduce.results` collects the raw results,
  :mod:`~fedquant.tools.reproduce.claims` decides each claim by its pre-registered
  test, and :mod:`~fedquant.tools.reproduce.report` (with
  :mod:`~fedquant.tools.reproduce.figures`) writes the Markdown + PNG report;
* :mod:`~fedquant.tools.reproduce.command` is the command line.
"""

from __future__ import annotations

from fedquant.tools.reproduce.command import main

__all__ = ["main"]
