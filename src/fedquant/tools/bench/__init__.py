"""fedquant's benchmark suite: the importable functions behind ``fedquant bench``.

* :func:`grid_table` -- OCTAV's noise coefficient vs the level grid and rounding
  (:mod:`fedquant.tools.bench.grid`);
* :mod:`fedquant.tools.bench.error` -- quantization error (NMSE) of fedquant, peers
  (:mod:`fedquant.tools.bench.peers`) and limits (:mod:`fedquant.tools.bench.limits`) on
  synthetic sources (:mod:`fedquant.tools.bench.sources`) and real weights
  (:mod:`fedquant.tools.bench.weights`);
* :mod:`fedquant.tools.bench.speed` -- throughput as a ratio to memcpy in the same run;
* :mod:`fedquant.tools.bench.report` -- the JSON and Markdown writers;
* :mod:`fedquant.tools.bench.cli` -- the command (``--quick`` is the smoke run the tests use).

Federated benchmarks live in :mod:`fedquant.tools.bench.federated`.
"""

from __future__ import annotations

from fedquant.tools.bench.grid import grid_table

__all__ = ["grid_table"]
