"""fedquant's benchmark suite: importable functions behind ``python -m fedquant.bench``.

* :func:`grid_table` -- OCTAV's noise coefficient vs the level grid and rounding
  (:mod:`fedquant.bench.grid`);
* :mod:`fedquant.bench.error` -- quantization error (NMSE) of fedquant, peers
  (:mod:`fedquant.bench.peers`) and limits (:mod:`fedquant.bench.limits`) on
  synthetic sources (:mod:`fedquant.bench.sources`) and real weights
  (:mod:`fedquant.bench.weights`);
* :mod:`fedquant.bench.speed` -- throughput as a ratio to memcpy in the same run;
* :mod:`fedquant.bench.report` -- the JSON and Markdown writers;
* :mod:`fedquant.bench.cli` -- the command (``--quick`` is the smoke run the tests use).

Federated benchmarks live in :mod:`fedquant.bench.federated`.
"""

from __future__ import annotations

from fedquant.bench.grid import grid_table

__all__ = ["grid_table"]
