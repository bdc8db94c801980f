"""The package's exceptions.

Every error fedquant raises on purpose derives from :class:`FedquantError`, so a
caller can catch them all in one place. The subclasses say *where* the problem
was found:

* :class:`InvalidInputError` -- a tensor or argument given to a function is
  unusable (NaN/Inf weights, ``bits=9``, an unknown threshold method).
  It is also a :class:`ValueError`.
* :class:`ConfigError` -- a configuration value (CLI flag, TOML file, spec
  string) is wrong. Its message names the option and the allowed values.
* :class:`DecodeError` -- a payload given to :func:`fedquant.decode` is not a
  valid fedquant payload (truncated, corrupted, wrong magic, unknown version,
  inconsistent lengths, out-of-range fields, absurd shapes). Decoding never
  crashes, hangs or allocates more than the payload justifies: it raises this.
* :class:`DataError` -- a data set is missing or malformed on disk.

Every error carries :attr:`FedquantError.detail`, the message without the
option prefix, so code that re-raises an error under another option name
(a CLI flag instead of a TOML key) never has to take the message apart.
"""

from __future__ import annotations


class FedquantError(Exception):
    """Base class of every error raised by fedquant on purpose."""

    @property
    def detail(self) -> str:
        """What is wrong, without the name of the option or argument it concerns."""
        return str(self)


class InvalidInputError(FedquantError, ValueError):
    """A tensor or argument passed to a fedquant function is unusable."""


class NonFiniteError(InvalidInputError):
    """A tensor holds NaN or Inf values where finite values are required."""


class ConfigError(FedquantError, ValueError):
    """A configuration value is invalid; the message names option and allowed values."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self._detail = message
        super().__init__(f"{option}: {message}")

    @property
    def detail(self) -> str:
        """The message without the ``option:`` prefix."""
        return self._detail

    def renamed(self, option: str) -> ConfigError:
        """The same error reported under another option name (e.g. the CLI flag typed)."""
        return ConfigError(option, self._detail)


class DecodeError(FedquantError, ValueError):
    """A payload is not a valid fedquant payload; the message says what is wrong."""


class DataError(FedquantError, OSError):
    """A data set is missing or malformed on disk."""
