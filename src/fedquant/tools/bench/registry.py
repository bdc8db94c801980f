"""Look up an entry of a benchmark registry (sources, peers) by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from fedquant.errors import InvalidInputError

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``; :class:`InvalidInputError` names ``what`` and the known names."""
    try:
        return registry[name]
    except KeyError:
        raise InvalidInputError(
            f"{what} {name!r} is unknown; expected one of: {', '.join(registry)}"
        ) from None
