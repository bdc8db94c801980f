"""Conversions between fedquant payloads and Flower records, and the instructions a server sends.

A quantized model update travels as **one** :class:`flwr.app.Array` holding the
whole fedquant payload (:mod:`fedquant.quant.codec`), so the bytes Flower
counts are the bytes fedquant produced::

    ArrayRecord({"fedquant": Array(dtype="uint8", shape=(len(payload),),
                                   stype="fedquant/v1", data=payload)})

Flower's own :meth:`Array.numpy` refuses this ``stype`` (it only reads
``"numpy.ndarray"``), so a stock aggregation can never average the packed
bytes by mistake: decode first (:func:`payload_from_record`).

The server tells clients how to quantize through the train ``ConfigRecord``
(:class:`UplinkConfig`, keys prefixed ``fedquant.``); a client needs no
fedquant settings of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedquant.errors import ConfigError, DecodeError, FedquantError
from fedquant.fl.aggregation import AggregationRule, parse_rule
from fedquant.quant.spec import SPEC_KEYS, QuantSpec

__all__ = [
    "CONFIG_PREFIX",
    "PAYLOAD_KEY",
    "STRATEGY_AGGREGATION",
    "STYPE",
    "UplinkConfig",
    "is_payload_record",
    "numpy_from_record",
    "parse_aggregation",
    "payload_from_record",
    "payload_record",
    "record_from_numpy",
]

#: ``Array.stype`` of a fedquant payload (the codec's wire-format version is inside it).
STYPE = "fedquant/v1"
#: key of the single Array in a payload ArrayRecord
PAYLOAD_KEY = "fedquant"
#: prefix of the ConfigRecord keys :class:`UplinkConfig` writes
CONFIG_PREFIX = "fedquant."
#: the aggregation setting that leaves the weighting to the wrapped Flower strategy
STRATEGY_AGGREGATION = "strategy"


def parse_aggregation(value: AggregationRule | str) -> str:
    """Normalize a server's aggregation setting: ``"strategy"`` or a fedquant rule's name.

    ``"strategy"`` means that the wrapped Flower strategy aggregates the
    dequantized models with its own rule; any other value must name a rule of
    :class:`fedquant.fl.aggregation.AggregationRule` (returned as its value).

    Raises
    ------
    ConfigError
        If ``value`` is neither (the message lists the allowed values).
    """
    if isinstance(value, str) and value.strip().lower() == STRATEGY_AGGREGATION:
        return STRATEGY_AGGREGATION
    try:
        return parse_rule(value).value
    except ConfigError:
        allowed = ", ".join([STRATEGY_AGGREGATION, *(r.value for r in AggregationRule)])
        raise ConfigError(
            "aggregation",
            f"{value!r} is not valid; expected one of {allowed} ('strategy': the wrapped "
            "Flower strategy weights the dequantized models itself)",
        ) from None


def payload_record(payload: bytes) -> ArrayRecord:
    """Wrap an encoded payload in an ArrayRecord of one ``fedquant/v1`` Array."""
    data = bytes(payload)
    return ArrayRecord(
        {PAYLOAD_KEY: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)}
    )


def is_payload_record(record: ArrayRecord) -> bool:
    """True if any Array in ``record`` has the fedquant ``stype``."""
    return any(a.stype == STYPE for a in record.values())


def payload_from_record(record: ArrayRecord) -> bytes:
    """The payload bytes of a record made by :func:`payload_record`.

    Raises
    ------
    DecodeError
        If ``record`` is not exactly one ``fedquant/v1`` Array whose declared
        shape matches its data (the payload itself is not validated here; the
        codec does that).
    """
    arrays = list(record.items())
    if len(arrays) != 1 or arrays[0][1].stype != STYPE:
        found = [f"{k!r} (stype {a.stype!r})" for k, a in arrays]
        raise DecodeError(
            f"payload_from_record: expected one Array with stype {STYPE!r}, found "
            f"{', '.join(found) or 'none'}; is fedquant_mod in the ClientApp's mods?"
        )
    array = arrays[0][1]
    if tuple(array.shape) != (len(array.data),):
        raise DecodeError(
            f"payload_from_record: Array {arrays[0][0]!r} declares shape {tuple(array.shape)} "
            f"but holds {len(array.data)} bytes"
        )
    return array.data


def numpy_from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a plain (``numpy.ndarray``) ArrayRecord, by name, in order.

    Raises
    ------
    FedquantError
        If an Array cannot be read as NumPy (e.g. an undecoded fedquant payload).
    """
    out: dict[str, np.ndarray] = {}
    for name, array in record.items():
        if array.stype == STYPE:
            raise FedquantError(
                f"numpy_from_record: {name!r} is a fedquant payload; decode it with "
                "fedquant.quant.codec.decode (or payload_from_record) first"
            )
        try:
            out[name] = array.numpy()
        except (TypeError, ValueError) as e:
            raise FedquantError(
                f"numpy_from_record: cannot read Array {name!r} (stype {array.stype!r}): {e}"
            ) from e
    return out


def record_from_numpy(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of plain NumPy Arrays, keeping the order of ``tensors``."""
    return ArrayRecord({name: Array(np.asarray(t)) for name, t in tensors.items()})


@dataclass(frozen=True)
class UplinkConfig:
    """What the server asks of every client in a training round.

    Attributes
    ----------
    spec : QuantSpec
        How clients quantize their upload.
    aggregation : str
        The server's rule (:func:`parse_aggregation`): a fedquant rule's name,
        or ``"strategy"`` when the wrapped Flower strategy weights the models.
        Clients disclose their number of examples only for ``fedavg`` and
        ``strategy`` (:attr:`discloses_num_examples`); for the other rules the
        mod reports ``num-examples = 1``.
    seed : int
        Run seed; a client's stochastic rounding uses the stream
        ``(seed, UPLINK, server round, partition id)``.
    """

    spec: QuantSpec
    aggregation: str = AggregationRule.INVERSE_MSE.value
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "aggregation", parse_aggregation(self.aggregation))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise ConfigError("seed", f"expected a non-negative integer, got {self.seed!r}")
        if int(self.seed) < 0:
            raise ConfigError("seed", f"expected a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def rule(self) -> AggregationRule | None:
        """fedquant's rule, or ``None`` when the wrapped strategy weights the models."""
        return None if self.aggregation == STRATEGY_AGGREGATION else parse_rule(self.aggregation)

    @property
    def discloses_num_examples(self) -> bool:
        """Whether the server's weighting reads the clients' numbers of examples."""
        return self.aggregation in (AggregationRule.FEDAVG.value, STRATEGY_AGGREGATION)

    def to_config(self) -> dict[str, Any]:
        """ConfigRecord entries (``fedquant.bits``, ``fedquant.aggregation``, ...)."""
        entries: dict[str, Any] = {
            CONFIG_PREFIX + k: v for k, v in self.spec.to_dict().items() if k in SPEC_KEYS
        }
        entries[CONFIG_PREFIX + "aggregation"] = self.aggregation
        entries[CONFIG_PREFIX + "seed"] = self.seed
        return entries

    @classmethod
    def from_config(cls, config: ConfigRecord | Mapping[str, Any]) -> UplinkConfig | None:
        """Read the entries :meth:`to_config` wrote; ``None`` if there are none.

        Raises
        ------
        ConfigError
            If the entries are present but invalid (the message names the key).
        """
        if CONFIG_PREFIX + "bits" not in config:
            return None
        spec_dict = {k: config[CONFIG_PREFIX + k] for k in SPEC_KEYS if CONFIG_PREFIX + k in config}
        try:
            seed = config[CONFIG_PREFIX + "seed"]
        except KeyError:
            raise ConfigError(
                CONFIG_PREFIX + "seed", "missing; the server must send the run seed"
            ) from None
        return cls(
            spec=QuantSpec.from_dict(spec_dict),
            aggregation=str(config.get(CONFIG_PREFIX + "aggregation", "inverse-mse")),
            seed=seed,  # type: ignore[arg-type]
        )
