"""Decoded and aggregated tensors as PyTorch tensors, in the dtypes they were sent in.

The codec and the aggregation work in NumPy (floating tensors as float32);
:func:`to_torch` turns their output into a ``state_dict`` that
``model.load_state_dict`` accepts, restoring each tensor's original dtype
(``float16``/``bfloat16``/``float64`` weights, ``int64`` BatchNorm counters,
``bool`` masks). PyTorch is imported only when it is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedquant.errors import InvalidInputError


def to_torch(arrays: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> dict[str, Any]:
    """``{name: torch.Tensor}`` of ``arrays``, each cast to ``dtypes[name]`` (a torch dtype name).

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        The values, in state-dict order.
    dtypes : Mapping[str, str]
        Per name, the dtype the tensor was sent in (``TensorInfo.dtype``, e.g.
        ``"float32"``, ``"bfloat16"``, ``"int64"``, ``"bool"``).

    Raises
    ------
    InvalidInputError
        PyTorch is not installed, or a name has no dtype.
    """
    try:
        import torch
    except ImportError:
        raise InvalidInputError(
            "to_torch: needs PyTorch (pip install torch); without it, use the NumPy arrays "
            "in .tensors"
        ) from None
    out: dict[str, Any] = {}
    for name, a in arrays.items():
        if name not in dtypes:
            raise InvalidInputError(f"to_torch: no dtype for tensor {name!r}")
        a = np.asarray(a)
        if not (a.flags.writeable and a.flags.c_contiguous and a.dtype.isnative):
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
            if not a.flags.writeable:
                a = a.copy()
        out[name] = torch.from_numpy(a).to(getattr(torch, dtypes[name]))
    return out
