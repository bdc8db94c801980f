"""QuantizedFedAvg: :class:`~fedquant.flower.QuantizedStrategy` around Flower's FedAvg.

With a fedquant rule (the default, ``inverse-mse``) the global model is the
one :func:`fedquant.fl.aggregation.aggregate_payloads` -- the function the
simulator uses -- computes from the clients' payloads, so both runtimes
compute the same global model from the same payloads, bit for bit.

Pair it with :func:`fedquant.flower.fedquant_mod` in the ClientApp.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvg

from fedquant.fl.aggregation import MSE_FLOOR_REL, AggregationRule
from fedquant.fl.robust import NORM_BOUND, TRIM_FRACTION
from fedquant.flower.quantized_strategy import QuantizedStrategy
from fedquant.quant.spec import QuantSpec

__all__ = ["QuantizedFedAvg"]


class QuantizedFedAvg(QuantizedStrategy):
    """Federated averaging of clipped, quantized client models (arXiv 2405.13365).

    ``QuantizedFedAvg(uplink, aggregation=..., **fedavg_kwargs)`` is
    ``QuantizedStrategy(FedAvg(**fedavg_kwargs), uplink, aggregation=...)``.

    Parameters
    ----------
    uplink : QuantSpec or str, default "8"
        How clients quantize their upload (``"4-2-2-4"``, ``"2"``, ...).
    aggregation : str, default "inverse-mse"
        A fedquant rule (``"inverse-mse"``, ``"fedavg"``, ``"mean"``, ...), or
        ``"strategy"`` for Flower's own FedAvg weighting of the dequantized
        models (by ``num-examples``). Only ``fedavg`` and ``strategy`` use the
        clients' numbers of examples; with the other rules clients report
        ``num-examples = 1`` (see :func:`~fedquant.flower.fedquant_mod`) and
        client metrics are plain means.
    downlink : QuantSpec or str, optional
        Broadcast the model quantized with this spec (default: float32).
    seed : int, default 0
        Run seed (see :class:`~fedquant.flower.QuantizedStrategy`).
    max_weight : float, optional
        Cap on any client's weight for any tensor (``cap_weights``).
    mse_floor_rel : float, default 1e-2
        Relative MSE floor of ``inverse-mse`` (:mod:`fedquant.fl.aggregation`).
    norm_bound : float, default :data:`fedquant.fl.robust.NORM_BOUND`
        A client's update of a tensor (its model minus the model sent to it)
        longer than this many times the median client's is left out of that
        tensor's aggregate; 0 = no bound (:mod:`fedquant.fl.robust`).
    trim_fraction : float, default :data:`fedquant.fl.robust.TRIM_FRACTION`
        ``trimmed-mean``: the fraction of clients dropped from each end.
    max_silent_rounds : int or None, default 3
        Stop after this many consecutive rounds without an admitted reply.
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``min_available_nodes``, ``train_metrics_aggr_fn``, ...).

    Notes
    -----
    For ``fedavg`` the weight is the ``num_examples`` the client wrote into
    its payload (the mod copies it from ``num-examples``), as in the
    simulator. The wrapped FedAvg is :attr:`strategy`.
    """

    def __init__(
        self,
        uplink: QuantSpec | str = "8",
        *,
        aggregation: AggregationRule | str = AggregationRule.INVERSE_MSE,
        downlink: QuantSpec | str | None = None,
        seed: int = 0,
        max_weight: float | None = None,
        mse_floor_rel: float = MSE_FLOOR_REL,
        norm_bound: float = NORM_BOUND,
        trim_fraction: float = TRIM_FRACTION,
        max_silent_rounds: int | None = 3,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(
            FedAvg(**fedavg_kwargs),
            uplink,
            aggregation=aggregation,
            downlink=downlink,
            seed=seed,
            max_silent_rounds=max_silent_rounds,
            aggregation_options={
                "max_weight": max_weight,
                "mse_floor_rel": mse_floor_rel,
                "norm_bound": norm_bound,
                "trim_fraction": trim_fraction,
            },
        )
