"""fedquant on Flower (``pip install 'fedquant[flower]'``, flwr >= 1.42).

The only part of fedquant that imports ``flwr``. Two pieces, both thin:

* :func:`fedquant_mod` -- a ClientApp mod that decodes a quantized broadcast
  and encodes the client's reply with the fedquant codec;
* :class:`QuantizedStrategy` -- a wrapper around any Flower strategy that
  admits the quantized replies and aggregates them with the simulator's own
  functions (inverse-MSE, FedAvg or mean weighting), or hands the dequantized
  models to the wrapped strategy; :class:`QuantizedFedAvg` is its FedAvg case.

::

    # client_app.py
    app = ClientApp(mods=[fedquant_mod])

    # server_app.py
    strategy = QuantizedStrategy(FedAdam(), uplink="4-2-2-4", aggregation="inverse-mse")
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=3)

See ``docs/flower.md`` for running it across machines.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fedquant.flower needs Flower: pip install 'fedquant[flower]' (flwr>=1.42,<1.43)"
    ) from e

from fedquant.flower.mod import NODE_BITS_KEY, fedquant_mod
from fedquant.flower.quantized_strategy import NoAdmittedRepliesError, QuantizedStrategy
from fedquant.flower.records import STYPE, UplinkConfig, payload_from_record, payload_record
from fedquant.flower.strategy import QuantizedFedAvg

__all__ = [
    "NODE_BITS_KEY",
    "STYPE",
    "NoAdmittedRepliesError",
    "QuantizedFedAvg",
    "QuantizedStrategy",
    "UplinkConfig",
    "fedquant_mod",
    "payload_from_record",
    "payload_record",
]
