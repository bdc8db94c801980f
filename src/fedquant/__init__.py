"""fedquant: communication-efficient federated learning via clipped uniform quantization.

Implements Bozorgasl & Chen, "Communication-Efficient Federated Learning via
Clipped Uniform Quantization" (arXiv 2405.13365): MSE-optimal (OCTAV) clipping,
B-bit uniform quantization with stochastic or nearest rounding, a bit-packed
wire format, and inverse-MSE aggregation.

The names below need only NumPy and numba (``pip install fedquant``); the
simulator (``fedquant run``) needs the ``sim`` extra, the Flower adapter
``fedquant.flower`` the ``flower`` extra, and ``to_torch()`` needs torch.

A round trip in a few lines (``model`` any ``torch.nn.Module``)::

    import fedquant

    payload = fedquant.encode(model.state_dict())       # bytes: 8-bit weights
    result = fedquant.aggregate([payload, payload])      # the server's side
    model.load_state_dict(result.to_torch())
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fedquant.errors import (
    ConfigError,
    DataError,
    DecodeError,
    FedquantError,
    InvalidInputError,
    NonFiniteError,
)
from fedquant.fl.aggregation import aggregate
from fedquant.quant.clipping import threshold
from fedquant.quant.codec import decode, encode, encode_with_stats
from fedquant.quant.quantizer import dequantize, quantize
from fedquant.quant.spec import QuantSpec

try:
    __version__ = version("fedquant")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ConfigError",
    "DataError",
    "DecodeError",
    "FedquantError",
    "InvalidInputError",
    "NonFiniteError",
    "QuantSpec",
    "__version__",
    "aggregate",
    "decode",
    "dequantize",
    "encode",
    "encode_with_stats",
    "quantize",
    "threshold",
]
