"""Parsing of the package's ``str`` enums (rounding, threshold method, ...) at the boundary."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from fedquant.errors import InvalidInputError

E = TypeVar("E", bound=Enum)


def parse_choice(enum_cls: type[E], value: E | str, what: str) -> E:
    """``enum_cls(value)`` (case-insensitive); :class:`InvalidInputError` names the allowed values.

    >>> from fedquant.quant.grid import Rounding
    >>> parse_choice(Rounding, "Nearest", "rounding")
    <Rounding.NEAREST: 'nearest'>
    """
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).lower())
    except ValueError:
        allowed = ", ".join(str(e.value) for e in enum_cls)
        raise InvalidInputError(
            f"{what}={value!r} is unknown; expected one of: {allowed}"
        ) from None


class StrChoice(str, Enum):
    """A ``str`` enum whose members print as their values (``f"{Upload.DELTA}"`` is
    ``"delta"``), so configurations write to TOML, JSON and messages as plain strings."""

    def __str__(self) -> str:
        return str(self.value)
