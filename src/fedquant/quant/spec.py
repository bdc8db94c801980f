"""Which tensor of a model update is quantized, and how: :class:`QuantSpec`.

A spec resolves every tensor of a state dict to a :class:`TensorPlan` (bit
width, threshold method, rounding, granularity). The rules, in order of
precedence:

1. ``rules``: ``(pattern, bits)`` pairs matched with :func:`fnmatch.fnmatchcase`
   against the tensor name; the first match wins. ``bits=32`` keeps a tensor
   in float32. Rules may quantize any floating tensor (a bias too).
2. ``layer_bits``: the paper's per-layer notation, e.g. ``"4-2-2-4"`` -- one
   width per *quantizable* tensor, in state-dict order. A quantizable tensor is
   a floating-point tensor with at least 2 dimensions (conv and linear weights).
   If given, its length must equal the number of quantizable tensors.
3. ``default_bits`` for the remaining quantizable tensors -- or, with a bit
   budget (``bits="auto:2.03"``, :attr:`QuantSpec.bit_budget`), widths
   allocated per encode from the tensors' values so that they average at
   most 2.03 bits per weight with the least expected error
   (:mod:`fedquant.quant.allocation`; :meth:`QuantSpec.resolve` then gives
   these tensors ``default_bits`` as a placeholder).

Everything else (biases, BatchNorm weights and statistics, 0-d and 1-d
tensors) travels as little-endian float32 unless a rule says otherwise;
integer tensors (e.g. BatchNorm's ``num_batches_tracked``) always travel raw.

>>> spec = QuantSpec.from_strings(bits="4-2-2-4")
>>> spec.layer_bits
(4, 2, 2, 4)
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from fedquant.errors import ConfigError, InvalidInputError
from fedquant.quant.clipping import ThresholdMethod, parse_method
from fedquant.quant.entropy import EntropyCoding, parse_entropy
from fedquant.quant.grid import FLOAT_BITS, Rounding, check_bits, parse_rounding
from fedquant.quant.quantizer import Granularity, parse_granularity

if TYPE_CHECKING:
    from fedquant.quant.plan import UpdatePlan

SPEC_VERSION = 1


@dataclass(frozen=True)
class QuantOptions:
    """How quantized tensors are treated, resolved to enums once.

    These are the options a :class:`QuantSpec` and each :class:`TensorPlan` share.

    Names are accepted for the enums (``rounding="nearest"``) and normalized
    when the object is made; a bad value raises :class:`ConfigError` naming the
    option.
    """

    method: ThresholdMethod = ThresholdMethod.OCTAV
    rounding: Rounding = Rounding.STOCHASTIC
    granularity: Granularity = Granularity.TENSOR
    percentile: float = 99.99
    rotation: bool = False
    entropy: EntropyCoding = EntropyCoding.NONE

    def __post_init__(self) -> None:
        for option, parse, value in (
            ("method", parse_method, self.method),
            ("rounding", parse_rounding, self.rounding),
            ("granularity", parse_granularity, self.granularity),
            ("entropy", parse_entropy, self.entropy),
        ):
            try:
                object.__setattr__(self, option, parse(value))
            except InvalidInputError as e:
                raise ConfigError(option, e.detail) from e
        pct: Any = self.percentile
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0.0 < pct <= 100.0:
            raise ConfigError("percentile", f"{pct!r} is not a number in (0, 100]")
        if not isinstance(self.rotation, bool):
            raise ConfigError("rotation", f"{self.rotation!r} is not valid; expected true or false")

    def options(self) -> dict[str, Any]:
        """The :class:`QuantOptions` fields of this object, by name."""
        return {f.name: getattr(self, f.name) for f in fields(QuantOptions)}


@dataclass(frozen=True)
class TensorPlan(QuantOptions):
    """How one tensor travels.

    ``bits`` is 1..8 (quantized) or 32 (float32, unchanged); the :class:`QuantOptions`
    are its spec's (enums, resolved once).
    """

    bits: int = field(kw_only=True)

    @property
    def quantized(self) -> bool:
        """Whether the tensor travels quantized (1..8 bits) rather than as float32."""
        return self.bits != FLOAT_BITS


def _bits(value: Any, option: str) -> int:
    try:
        return check_bits(value, allow_float=True, where=option)
    except InvalidInputError as e:
        raise ConfigError(option, e.detail) from e


#: the paper's per-layer notation: ASCII integers joined by single '-' (or ',')
_WIDTHS = re.compile(r"[0-9]+(?:[-,][0-9]+)*")
_INT = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def parse_layer_bits(text: str) -> tuple[int, ...]:
    """Parse the paper's ``"4-2-2-4"`` notation (also ``"4,2,2,4"``) into widths.

    The widths are ASCII integers joined by single ``-`` or ``,`` with no
    spaces: ``"-4"``, ``"4--2"``, ``"4-2-"``, ``"4 - 2"`` or non-ASCII digits
    are refused rather than guessed at.

    >>> parse_layer_bits("4-2-2-4")
    (4, 2, 2, 4)
    """
    raw = str(text).strip()
    if not raw:
        raise ConfigError("bits", f"{text!r} is empty; expected e.g. '4-2-2-4' or '8'")
    if not _WIDTHS.fullmatch(raw):
        raise ConfigError(
            "bits",
            f"{text!r} is not valid; expected one width or one per weight tensor, each an "
            "integer 1..8 or 32 written in ASCII digits and joined by single '-' (or ','), "
            "e.g. '8' or '4-2-2-4'",
        )
    return tuple(_bits(int(p), "bits") for p in re.split("[-,]", raw))


def parse_budget(text: str) -> float:
    """Parse ``"auto:2.03"`` (average bits per weight, 1..8) into ``2.03``."""
    _, _, value = str(text).partition(":")
    budget = float(value) if _DECIMAL.fullmatch(value) else math.nan
    if not (math.isfinite(budget) and 1.0 <= budget <= 8.0):
        raise ConfigError(
            "bits",
            f"{text!r} is not a bit budget; expected 'auto:BITS' with BITS the average bits per "
            "weight in [1, 8], e.g. 'auto:2.03'",
        )
    return budget


def parse_rules(text: str) -> tuple[tuple[str, int], ...]:
    """Parse ``"fc2.*=8,conv1.weight=32"`` into ``(pattern, bits)`` pairs."""
    rules = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern.strip():
            raise ConfigError(
                "rules", f"{item!r} is not PATTERN=BITS; expected e.g. 'fc2.*=8,*.bias=32'"
            )
        if not _INT.fullmatch(value.strip()):
            raise ConfigError(
                "rules",
                f"{item!r}: {value!r} is not an integer in ASCII digits; expected bits 1..8 "
                "or 32, e.g. 'fc2.*=8'",
            )
        rules.append((pattern.strip(), _bits(int(value), "rules")))
    return tuple(rules)


def _check_options(options: Mapping[str, Any]) -> None:
    """Refuse keyword arguments that are not :class:`QuantSpec` fields."""
    known = [f.name for f in fields(QuantSpec) if f.name != "version"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            "spec", f"unknown option(s) {', '.join(unknown)}; expected some of {', '.join(known)}"
        )


def _layer_bits(raw: Any) -> tuple[int, ...]:
    """``QuantSpec.layer_bits`` as a tuple of widths (a ``"4-2-2-4"`` string is parsed)."""
    if isinstance(raw, str):
        return parse_layer_bits(raw) if raw.strip() else ()
    if isinstance(raw, Iterable) and not isinstance(raw, Mapping):
        return tuple(_bits(b, "bits") for b in raw)
    raise ConfigError(
        "bits",
        f"layer_bits={raw!r} is not a sequence of widths; expected e.g. (4, 2, 2, 4) or "
        "'4-2-2-4' (one width for every tensor: default_bits=4)",
    )


def _rules(raw: Any) -> tuple[tuple[str, int], ...]:
    """``QuantSpec.rules`` as ``(pattern, bits)`` pairs, from pairs, a dict or a string."""
    if isinstance(raw, str):
        return parse_rules(raw)
    items = raw.items() if isinstance(raw, Mapping) else raw
    expected = "expected (pattern, bits) pairs, e.g. (('fc2.*', 8),), {'fc2.*': 8} or 'fc2.*=8'"
    try:
        pairs = [(item, (item,) if isinstance(item, str) else tuple(item)) for item in items]
    except TypeError:
        raise ConfigError("rules", f"{raw!r} is not valid; {expected}") from None
    out = []
    for item, pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
            raise ConfigError("rules", f"{item!r} in {raw!r} is not a rule; {expected}")
        out.append((pair[0], _bits(pair[1], "rules")))
    return tuple(out)


@dataclass(frozen=True)
class QuantSpec(QuantOptions):
    """Quantization settings of a whole model update (see the module docstring).

    Attributes
    ----------
    layer_bits : tuple of int
        Per quantizable tensor, in order (the paper's ``4-2-2-4``); empty = use ``default_bits``.
    rules : tuple of (str, int)
        Name patterns and bit widths; the first match wins.
    default_bits : int, default 8
        Width of quantizable tensors not covered by the above.
    method : ThresholdMethod, default "octav"
    rounding : Rounding, default "stochastic"
    granularity : Granularity, default "tensor"
    percentile : float, default 99.99
        For ``method="percentile"``.
    rotation : bool, default False
        Rotate every quantized tensor with a seeded randomized Hadamard
        transform before clipping (:mod:`fedquant.quant.rotation`); encoder and
        decoder then need the same ``shared_key``.
    entropy : EntropyCoding, default "none"
        ``"rans"`` entropy-codes the codes of every quantized tensor where that
        saves bytes (:mod:`fedquant.quant.entropy`).
    bit_budget : float, optional
        Average bits per weight (1..8) to allocate over the quantizable tensors
        no rule covers (``bits="auto:2.03"``); excludes ``layer_bits``.
    """

    layer_bits: tuple[int, ...] = ()
    rules: tuple[tuple[str, int], ...] = ()
    default_bits: int = 8
    bit_budget: float | None = None
    version: int = field(default=SPEC_VERSION, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_bits", _layer_bits(self.layer_bits))
        object.__setattr__(self, "rules", _rules(self.rules))
        object.__setattr__(self, "default_bits", _bits(self.default_bits, "default_bits"))
        super().__post_init__()
        if self.bit_budget is not None:
            b = self.bit_budget
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise ConfigError("bits", f"bit budget {b!r} is not a number; expected 1..8")
            object.__setattr__(self, "bit_budget", parse_budget(f"auto:{float(b)!r}"))
            if self.layer_bits:
                raise ConfigError(
                    "bits", "a bit budget ('auto:...') and per-layer widths exclude each other"
                )

    @classmethod
    def from_strings(
        cls,
        bits: str | int = 8,
        rules: str = "",
        **kwargs: Any,
    ) -> QuantSpec:
        """Build a spec from CLI-style strings: ``bits="4-2-2-4"``, ``"8"`` or ``"auto:2.03"``."""
        _check_options(kwargs)
        if str(bits).strip().lower().startswith("auto:"):
            return cls(bit_budget=parse_budget(str(bits)), rules=parse_rules(rules), **kwargs)
        widths = parse_layer_bits(str(bits))
        if len(widths) == 1:
            return cls(default_bits=widths[0], rules=parse_rules(rules), **kwargs)
        return cls(layer_bits=widths, rules=parse_rules(rules), **kwargs)

    def with_(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        _check_options(changes)
        return replace(self, **changes)

    def describe_bits(self) -> str:
        """The bit setting in the notation it was given (``4-2-2-4``, ``8`` or ``auto:2.03``)."""
        if self.bit_budget is not None:
            return f"auto:{self.bit_budget!r}"
        if self.layer_bits:
            return "-".join(str(b) for b in self.layer_bits)
        return str(self.default_bits)

    @staticmethod
    def is_quantizable(shape: tuple[int, ...], floating: bool) -> bool:
        """Conv/linear weights: floating tensors with at least 2 dimensions."""
        return floating and len(shape) >= 2

    def allocatable(self, tensors: Mapping[str, tuple[tuple[int, ...], bool]]) -> list[str]:
        """The quantizable tensors no rule covers, in order: those a bit budget governs."""
        return [
            n
            for n, (shape, fl) in tensors.items()
            if self.is_quantizable(shape, fl) and not any(fnmatchcase(n, p) for p, _ in self.rules)
        ]

    def resolve(self, tensors: Mapping[str, tuple[tuple[int, ...], bool]]) -> dict[str, TensorPlan]:
        """Plan for every tensor, given ``name -> (shape, is_floating)`` in state-dict order.

        Integer tensors get no plan entry with bits < 32: they always travel raw.
        Plans are remembered per spec and model layout (a client encodes the
        same layout every round).
        """
        layout = tuple((n, tuple(shape), bool(fl)) for n, (shape, fl) in tensors.items())
        return dict(_resolve(self, layout))

    def _plans(self, tensors: Mapping[str, tuple[tuple[int, ...], bool]]) -> dict[str, TensorPlan]:
        quantizable = [n for n, (shape, fl) in tensors.items() if self.is_quantizable(shape, fl)]
        if self.layer_bits and len(self.layer_bits) != len(quantizable):
            raise ConfigError(
                "bits",
                f"{self.describe_bits()!r} gives {len(self.layer_bits)} per-layer widths but the "
                f"model has {len(quantizable)} quantizable tensors ({', '.join(quantizable)}); "
                "give one width per tensor or a single width",
            )
        self._check_rules([n for n, (_, fl) in tensors.items() if fl])
        positional = dict(zip(quantizable, self.layer_bits, strict=False))
        options = self.options()
        plans: dict[str, TensorPlan] = {}
        for name, (_shape, floating) in tensors.items():
            bits = FLOAT_BITS
            if floating:
                rule = next((b for p, b in self.rules if fnmatchcase(name, p)), None)
                if rule is not None:
                    bits = rule
                elif name in positional:
                    bits = positional[name]
                elif name in quantizable:
                    bits = self.default_bits
            plans[name] = TensorPlan(bits=bits, **options)
        return plans

    def _check_rules(self, floating: list[str]) -> None:
        """Refuse a rule that matches no floating tensor, or only tensors earlier rules took."""
        for i, (pattern, bits) in enumerate(self.rules):
            hits = [n for n in floating if fnmatchcase(n, pattern)]
            if not hits:
                raise ConfigError(
                    "rules",
                    f"pattern {pattern!r} matches no floating-point tensor (integer tensors always "
                    f"travel raw); the model's are: {_name_list(floating)}",
                )
            earlier = [p for p, _ in self.rules[:i]]
            if all(any(fnmatchcase(n, p) for p in earlier) for n in hits):
                raise ConfigError(
                    "rules",
                    f"'{pattern}={bits}' never applies: every tensor it matches "
                    f"({_name_list(hits)}) is taken by an earlier rule (the first match wins); "
                    "put it first or remove it",
                )

    def plan(self, tensors: Mapping[str, Any]) -> UpdatePlan:
        """How each tensor of ``tensors`` travels: bits and payload bytes, per tensor.

        The bytes are measured by encoding ``tensors`` once (seed 0), so they
        are exact for these values; a bit budget (``auto:B``) is allocated
        from them, and entropy-coded sizes depend on them. ``print()`` the
        result for a table.

        >>> import numpy as np
        >>> state = {"fc.weight": np.ones((10, 20), np.float32), "fc.bias": np.zeros(10)}
        >>> print(QuantSpec(default_bits=4).plan(state))
        tensor     shape  sent as  bytes
        fc.weight  10x20  4 bits     159
        fc.bias    10     float32     85
        payload: 272 bytes (3.1x smaller than float32: 840 bytes)
        """
        from fedquant.quant.plan import plan  # it encodes, and the codec imports this module

        return plan(tensors, self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/TOML-friendly description (round-trips through :meth:`from_dict`)."""
        return {
            "bits": self.describe_bits(),
            "rules": ",".join(f"{p}={b}" for p, b in self.rules),
            "method": self.method.value,
            "rounding": self.rounding.value,
            "granularity": self.granularity.value,
            "percentile": self.percentile,
            "rotation": self.rotation,
            "entropy": self.entropy.value,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        """Build a spec from :meth:`to_dict`'s form; unknown keys are a ConfigError."""
        known = set(SPEC_KEYS)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(
                "spec", f"unknown key(s) {sorted(unknown)}; expected some of {sorted(known)}"
            )
        kw = {
            k: d[k]
            for k in ("method", "rounding", "granularity", "percentile", "rotation", "entropy")
            if k in d
        }
        return cls.from_strings(bits=d.get("bits", 8), rules=d.get("rules", ""), **kw)


@functools.lru_cache(maxsize=64)
def _resolve(
    spec: QuantSpec, layout: tuple[tuple[str, tuple[int, ...], bool], ...]
) -> dict[str, TensorPlan]:
    """:meth:`QuantSpec.resolve` of a layout, cached (callers get a copy of the dict)."""
    return spec._plans({n: (shape, fl) for n, shape, fl in layout})


#: the keys of :meth:`QuantSpec.to_dict` / :meth:`QuantSpec.from_dict`, in order
SPEC_KEYS: tuple[str, ...] = (
    "bits",
    "rules",
    "method",
    "rounding",
    "granularity",
    "percentile",
    "rotation",
    "entropy",
)


def plans_summary(plans: Mapping[str, TensorPlan]) -> Iterable[str]:
    """Human-readable lines ``name: bits`` (for logs)."""
    return (f"{n}: {'float32' if not p.quantized else f'{p.bits} bits'}" for n, p in plans.items())


def _name_list(names: list[str], limit: int = 12) -> str:
    """``a, b, c`` -- at most ``limit`` names, then how many more."""
    if not names:
        return "(none)"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"
