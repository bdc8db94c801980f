"""``python -m fedquant.bench``: run the benchmark suite (see :mod:`fedquant.bench.cli`)."""

from __future__ import annotations

import sys

from fedquant.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
