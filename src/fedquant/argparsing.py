"""The argument parser every ``fedquant`` command uses: one-line errors, exit status 2.

A user error on the command line (an unknown flag, a bad value) prints one
line naming it and exits with :data:`EXIT_USER_ERROR`; no usage block, no
traceback. :mod:`fedquant.cli` and the tools' entry points (each a
``main(argv, prog) -> int``) build their parsers from :class:`Parser`.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["EXIT_USER_ERROR", "Parser"]

#: exit status of a user error (bad flags, bad config values, missing data)
EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """:class:`argparse.ArgumentParser` whose errors are one line and exit 2.

    Examples
    --------
    >>> p = Parser(prog="fedquant demo")
    >>> _ = p.add_argument("--n", type=int)
    >>> p.parse_args(["--n", "x"])
    Traceback (most recent call last):
    SystemExit: 2
    """

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see --help)`` to stderr and exit 2."""
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")
