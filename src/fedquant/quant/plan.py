"""How an update travels, per tensor: :func:`plan` (``QuantSpec.plan``) and :class:`UpdatePlan`.

The plan is measured, not estimated: it encodes the tensors once and reads
each record's bit width and size from the result, so it holds for every
layout the codec has (rotation padding, rANS coding, bit budgets allocated
from the values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedquant.quant.codec import TensorInfo, _check_args, encode_with_stats
from fedquant.quant.grid import FLOAT_BITS
from fedquant.quant.spec import QuantSpec


@dataclass(frozen=True)
class UpdatePlan:
    """How one update travels (:meth:`QuantSpec.plan`); ``str()`` is a table."""

    rows: tuple[TensorInfo, ...]  # per tensor: name, shape, dtype, bits, record bytes (nbytes)
    nbytes: int  # the whole payload: header, metadata, records and checksum
    float32_nbytes: int  # the same tensors as raw float32 (integers at their own size)

    def __str__(self) -> str:
        table = [("tensor", "shape", "sent as", "bytes")] + [
            (r.name, "x".join(map(str, r.shape)) or "()", _sent_as(r), f"{r.nbytes:,}")
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        lines = [
            "  ".join(
                (c.rjust(w) if i == 3 else c.ljust(w))
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in table
        ]
        ratio = self.float32_nbytes / self.nbytes if self.nbytes else math.nan
        lines.append(
            f"payload: {self.nbytes:,} bytes ({ratio:.1f}x smaller than float32: "
            f"{self.float32_nbytes:,} bytes)"
        )
        return "\n".join(lines)


def _sent_as(info: TensorInfo) -> str:
    if info.quantized:
        return f"{info.bits} bits"
    return "float32" if info.bits == FLOAT_BITS and "float" in info.dtype else info.dtype


def plan(tensors: Mapping[str, Any], spec: QuantSpec | None = None) -> UpdatePlan:
    """Per tensor, how ``tensors`` travel under ``spec`` (see :meth:`QuantSpec.plan`).

    Encodes once with seed 0 (and shared key 0 if the spec rotates): the sizes
    of stochastic and nearest rounding are the same, and rANS-coded sizes are
    those of these values.
    """
    spec = _check_args(tensors, spec, None)
    res = encode_with_stats(tensors, spec, seed=0, shared_key=0 if spec.rotation else None)
    return UpdatePlan(tuple(res.tensors.values()), res.nbytes, res.float32_nbytes)
