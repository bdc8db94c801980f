"""``python -m fedquant.tools.bench``: run the benchmark suite (see :mod:`fedquant.tools.bench.cli`)."""

from __future__ import annotations

import sys

from fedquant.tools.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "python -m fedquant.tools.bench"))
