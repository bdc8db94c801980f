"""The configuration of a federated run: one frozen dataclass, validated at the boundary.

Every field is a CLI flag (``--num-clients``) and a key of the TOML file given
to ``--config`` (flat, or grouped in any tables: ``[clients] num_clients = 30``);
flags override the file, the file overrides the defaults. :data:`FIELDS`
describes each option once (help text, allowed values) for the CLI, the TOML
reader and the errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from fedquant.choices import StrChoice
from fedquant.errors import ConfigError, InvalidInputError
from fedquant.fl.adversary import ATTACKS as ADVERSARY_ATTACKS
from fedquant.fl.adversary import MODES as ADVERSARY_MODES
from fedquant.fl.aggregation import AggregationRule
from fedquant.fl.names import DATASETS
from fedquant.fl.partition import Scheme
from fedquant.fl.robust import BYZANTINE_FRACTION, NORM_BOUND, TRIM_FRACTION
from fedquant.fl.train_config import ClientOptimizer, TrainConfig
from fedquant.fl.updates import Upload
from fedquant.quant.clipping import ThresholdMethod
from fedquant.quant.entropy import EntropyCoding
from fedquant.quant.grid import Rounding
from fedquant.quant.quantizer import Granularity
from fedquant.quant.spec import SPEC_KEYS, QuantSpec


class LrSchedule(StrChoice):
    """The clients' learning rate over rounds (:func:`fedquant.fl.simulation.round_lr`)."""

    CONSTANT = "constant"
    COSINE = "cosine"
    STEP = "step"


class MseSpread(StrChoice):
    """Whether inverse-MSE aggregation adds the clients' spread to their MSE."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Device(StrChoice):
    """The torch device that trains and evaluates."""

    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


def _choices(enum: Any) -> tuple[str, ...]:
    return tuple(e.value for e in enum)


#: the fields of :class:`RunConfig` that make the uplink spec: the spec's own keys, each a
#: keyword of :meth:`fedquant.quant.spec.QuantSpec.from_strings`
UPLINK_SPEC_FIELDS = SPEC_KEYS


@dataclass(frozen=True)
class RunConfig:
    """All settings of a run (defaults: the ``fedquant run`` default job)."""

    # data
    dataset: str = "mnist-embedded"
    data_root: str | None = None
    cache_dir: str | None = None
    # clients
    num_clients: int = 10
    partition: Scheme = Scheme.IID
    alpha: float = 0.5
    shards_per_client: int = 2
    client_fraction: float = 1.0
    # model and local training
    model: str = "paper-cnn"
    rounds: int = 30
    # (the defaults of the local-training fields are TrainConfig's)
    epochs: int = TrainConfig.epochs
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    momentum: float = TrainConfig.momentum
    weight_decay: float = TrainConfig.weight_decay
    qat: bool = TrainConfig.qat
    # client optimizer, schedule, FedProx; server optimizer; per-client widths
    optimizer: ClientOptimizer = TrainConfig.optimizer
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    lr_step_rounds: int = 10
    lr_gamma: float = 0.1
    prox_mu: float = TrainConfig.prox_mu
    server_optimizer: str = "none"
    server_lr: float | None = None
    server_momentum: float | None = None
    server_beta2: float | None = None
    server_tau: float | None = None
    client_bits: str = ""
    mse_spread: MseSpread = MseSpread.AUTO
    # uplink quantization
    bits: str = "4-2-2-4"
    rules: str = ""
    method: str = "octav"
    rounding: str = "stochastic"
    granularity: str = "tensor"
    percentile: float = 99.99
    rotation: bool = False
    entropy: str = "none"
    upload: Upload = Upload.WEIGHTS
    error_feedback: bool = False
    # downlink quantization ("32" = the global model travels as float32)
    downlink_bits: str = "32"
    downlink_rounding: str = "nearest"
    # server
    aggregation: str = "inverse-mse"
    weight_cap: float = 3.0
    mse_floor: float = 1e-2
    norm_bound: float = NORM_BOUND
    trim_fraction: float = TRIM_FRACTION
    byzantine_fraction: float = BYZANTINE_FRACTION
    min_clients: int = 1
    failure_rate: float = 0.0
    hostile_fraction: float = 0.0
    hostile_mode: str = "mixed"
    eval_every: int = 1
    # run
    seed: int = 0
    device: Device = Device.CPU
    threads: int = 0
    batched_clients: int = 0
    out: str = "runs"

    def __post_init__(self) -> None:
        for f in fields(self):
            spec = FIELDS[f.name]
            value = getattr(self, f.name)
            checked = spec.check(f.name, value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        if self.min_clients > self.num_clients:
            raise ConfigError(
                "min_clients", f"{self.min_clients} exceeds num_clients={self.num_clients}"
            )
        if self.error_feedback and self.upload is not Upload.DELTA:
            raise ConfigError(
                "error_feedback",
                f"needs upload='delta' (got '{self.upload}'): the residual is that of the "
                "quantized update; expected --upload delta or --no-error-feedback",
            )
        if self.qat and self.upload is Upload.DELTA:
            raise ConfigError(
                "qat",
                "fake-quantizes the weights, but upload='delta' quantizes the update; "
                "expected --upload weights with --qat",
            )
        if self.qat and self.rotation:
            raise ConfigError(
                "rotation",
                "cannot be combined with --qat: quantization-aware training fake-quantizes "
                "without the rotation, so it would train against another quantizer; "
                "expected --no-rotation or --no-qat",
            )
        if self.client_bits and self.bits.startswith("auto"):
            raise ConfigError(
                "client_bits",
                f"gives every client one width, but bits={self.bits!r} allocates widths per "
                "tensor; expected --client-bits '' or fixed --bits",
            )
        if self.client_bits and self.qat:
            raise ConfigError(
                "client_bits",
                "cannot be combined with --qat (quantization-aware training uses the run's "
                "--bits); expected --no-qat",
            )
        self.uplink_spec()  # validates bits/rules/method/... together
        self.server_optimizer_obj()
        self.downlink_spec()

    def uplink_spec(self) -> QuantSpec:
        """The clients' quantization spec (:data:`UPLINK_SPEC_FIELDS`)."""
        return QuantSpec.from_strings(**{k: getattr(self, k) for k in UPLINK_SPEC_FIELDS})

    def client_widths(self) -> tuple[tuple[int, float], ...]:
        """``client_bits`` parsed: ``((bits, fraction of clients), ...)``; empty when unset."""
        return parse_client_bits(self.client_bits)

    @property
    def uses_spread(self) -> bool:
        """Whether inverse-MSE adds the clients' spread (``mse_spread``)."""
        return self.mse_spread is MseSpread.ON or (
            self.mse_spread is MseSpread.AUTO and bool(self.client_bits)
        )

    def server_optimizer_obj(self) -> Any:
        """The :class:`~fedquant.fl.server_opt.ServerOptimizer` of ``server_*``."""
        from fedquant.fl.server_opt import ServerOptimizer

        return ServerOptimizer.create(
            self.server_optimizer,
            lr=self.server_lr,
            momentum=self.server_momentum,
            beta2=self.server_beta2,
            tau=self.server_tau,
        )

    def downlink_spec(self) -> QuantSpec | None:
        """The server's broadcast spec, or ``None`` for float32."""
        shared = {k: getattr(self, k) for k in ("method", "granularity", "percentile")}
        try:
            spec = QuantSpec.from_strings(
                bits=self.downlink_bits, rounding=self.downlink_rounding, **shared
            )
        except ConfigError as e:
            raise e.renamed(f"downlink_{e.option}") from e
        return None if spec.layer_bits == () and spec.default_bits == 32 else spec

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "config") -> RunConfig:
        """Build from a (possibly nested) mapping, e.g. a parsed TOML file; keys may use '-' or '_'.

        Options the mapping leaves out take the data set's defaults
        (:data:`DATASET_DEFAULTS`), then :class:`RunConfig`'s.
        """
        return cls(**with_dataset_defaults(flat_options(values, source=source)))


def flat_options(values: Mapping[str, Any], *, source: str = "config") -> dict[str, Any]:
    """The options of a (possibly nested) mapping as one flat dict; unknown keys are refused."""
    flat: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], path: str) -> None:
        for k, v in d.items():
            key = str(k).replace("-", "_")
            if isinstance(v, Mapping):
                walk(v, f"{path}{k}.")
                continue
            if key not in FIELDS:
                raise ConfigError(
                    f"{path}{k}",
                    f"unknown option in {source}; known options: {', '.join(FIELDS)}",
                )
            flat[key] = v

    walk(values, "")
    return flat


_TEXT_DEFAULTS: dict[str, Any] = {
    "model": "char-transformer",
    "bits": "4",
    "optimizer": "adam",
    "lr": 0.005,
    "batch_size": 16,
}
#: data set -> the options it changes from RunConfig's defaults when they are not given
#: (the CLI's flags and --config file, :meth:`RunConfig.from_mapping`): the paper's
#: "4-2-2-4" bits and plain SGD fit its CNN, not a transformer
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "python-stdlib-text": _TEXT_DEFAULTS,
    "text": _TEXT_DEFAULTS,
}


def with_dataset_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` plus :data:`DATASET_DEFAULTS` of its ``dataset`` for the options it lacks."""
    extra = DATASET_DEFAULTS.get(str(values.get("dataset", "")), {})
    return {**extra, **values}


@dataclass(frozen=True)
class Field:
    """One option: its help text and what values it accepts."""

    help: str
    kind: type
    choices: tuple[str, ...] = ()
    lo: float | None = None
    hi: float | None = None
    optional: bool = False
    check_fn: Any = None
    #: the :class:`~fedquant.choices.StrChoice` a checked value becomes (``choices`` are its values)
    enum: type[StrChoice] | None = None

    @classmethod
    def choice(cls, help: str, enum: type[StrChoice]) -> Field:
        """An option whose values are ``enum``'s."""
        return cls(help, str, _choices(enum), enum=enum)

    def describe(self) -> str:
        if self.choices:
            return "one of: " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        rng = []
        if self.lo is not None:
            rng.append(f">= {self.lo:g}")
        if self.hi is not None:
            rng.append(f"<= {self.hi:g}")
        what = {int: "an integer", float: "a number", str: "a string"}[self.kind]
        return what + (" " + " and ".join(rng) if rng else "")

    def check(self, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(name, f"{value!r} is not valid; expected {self.describe()}")
            return value
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(name, f"{value!r} is not valid; expected {self.describe()}")
        elif self.kind is float:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ConfigError(name, f"{value!r} is not valid; expected {self.describe()}")
            value = float(value)
        elif not isinstance(value, str):
            raise ConfigError(name, f"{value!r} is not valid; expected {self.describe()}")
        if self.choices and value not in self.choices:
            raise ConfigError(name, f"{value!r} is not valid; expected {self.describe()}")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise ConfigError(name, f"{value!r} is out of range; expected {self.describe()}")
        if self.enum is not None:
            return self.enum(value)
        if self.check_fn is not None:
            try:
                self.check_fn(value)
            except (ConfigError, InvalidInputError) as e:
                detail = e.detail
                if not detail.startswith(repr(value)):  # name the value once
                    detail = f"{value!r} is not valid: {detail}"
                raise ConfigError(name, detail) from e
        return value


def _model_check(value: str) -> None:
    from fedquant.fl.models import MODELS

    if value not in MODELS and ":" not in value:
        raise ConfigError(
            "model", f"expected one of: {', '.join(MODELS)}, or 'package.module:factory'"
        )


def parse_client_bits(value: str) -> tuple[tuple[int, float], ...]:
    """``"2:0.5,4:0.3,8:0.2"`` -> ``((2, 0.5), (4, 0.3), (8, 0.2))``; ``""`` -> ``()``.

    Widths are integers in 1..8, each at most once; fractions are > 0 and sum to 1.
    """
    if not value.strip():
        return ()
    out: list[tuple[int, float]] = []
    for item in value.split(","):
        bits_s, sep, frac_s = item.strip().partition(":")
        try:
            bits, frac = int(bits_s), float(frac_s)
        except ValueError:
            bits, frac = 0, math.nan
        if not sep or not 1 <= bits <= 8 or not (math.isfinite(frac) and frac > 0):
            raise ConfigError(
                "client_bits",
                f"{item.strip()!r} is not BITS:FRACTION with BITS in 1..8 and FRACTION > 0 "
                "(e.g. '2:0.5,4:0.3,8:0.2')",
            )
        if any(b == bits for b, _ in out):
            raise ConfigError("client_bits", f"width {bits} is given twice in {value!r}")
        out.append((bits, frac))
    total = sum(f for _, f in out)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError("client_bits", f"the fractions in {value!r} sum to {total:g}, expected 1")
    return tuple(out)


def _client_bits_check(value: str) -> None:
    parse_client_bits(value)


def _bits_check(value: str) -> None:
    QuantSpec.from_strings(bits=value)


def _norm_bound_check(value: float) -> None:
    if 0 < value < 1:
        raise ConfigError("norm_bound", "expected 0 (no bound) or a number >= 1")


def _half_open_check(value: float) -> None:
    if value >= 0.5:
        raise ConfigError("fraction", "expected a number >= 0 and below 0.5")


def _rules_check(value: str) -> None:
    QuantSpec.from_strings(rules=value)


FIELDS: dict[str, Field] = {
    "dataset": Field(
        "data set to train on (python-stdlib-text and text: next-character prediction, "
        "with defaults model=char-transformer, bits=4, optimizer=adam, lr=0.005, batch_size=16 "
        "for the options not given)",
        str,
        DATASETS,
    ),
    "data_root": Field(
        "directory or archive holding the data set's files (not needed for mnist-embedded; for "
        "python-stdlib-text another standard-library folder, default the running Python's)",
        str,
        optional=True,
    ),
    "cache_dir": Field(
        "where decoded data sets are cached (default $FEDQUANT_CACHE or ~/.cache/fedquant)",
        str,
        optional=True,
    ),
    "num_clients": Field("number of clients N", int, lo=1, hi=100_000),
    "partition": Field.choice("how the training set is split among clients", Scheme),
    "alpha": Field(
        "Dirichlet concentration for --partition dirichlet (smaller = more skew)", float, lo=1e-6
    ),
    "shards_per_client": Field("label shards per client for --partition shards", int, lo=1),
    "client_fraction": Field("fraction of clients sampled each round", float, lo=1e-9, hi=1.0),
    "model": Field(
        "model: 'paper-cnn', 'char-transformer' (for the text data sets), or "
        "'package.module:factory' with factory(in_shape, num_classes) -> nn.Module",
        str,
        check_fn=_model_check,
    ),
    "rounds": Field("number of federated rounds", int, lo=1),
    "epochs": Field("local epochs per round", int, lo=1),
    "batch_size": Field("local mini-batch size", int, lo=1),
    "lr": Field("local learning rate (of round 1 with --lr-schedule)", float, lo=0.0),
    "momentum": Field(
        "local SGD momentum (optimizer state is reset every round)", float, lo=0.0, hi=1.0
    ),
    "weight_decay": Field("local weight decay (L2; decoupled for adamw)", float, lo=0.0),
    "qat": Field("quantization-aware local training (straight-through estimator)", bool),
    "optimizer": Field.choice(
        "client optimizer (its state starts fresh every round)", ClientOptimizer
    ),
    "lr_schedule": Field.choice(
        "learning rate over rounds: constant; cosine (lr * (1 + cos(pi (t-1) / rounds)) / 2 in "
        "round t); step (lr * lr_gamma ** ((t-1) // lr_step_rounds))",
        LrSchedule,
    ),
    "lr_step_rounds": Field("rounds between decays for --lr-schedule step", int, lo=1),
    "lr_gamma": Field("decay factor for --lr-schedule step", float, lo=0.0, hi=1.0),
    "prox_mu": Field(
        "FedProx: each client adds (prox_mu / 2) ||w - w_global||^2 to its loss; 0 = off",
        float,
        lo=0.0,
    ),
    "server_optimizer": Field(
        "server optimizer applied to the aggregated pseudo-gradient (Reddi et al. 2021); "
        "none = the aggregate is the new model",
        str,
        ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad"),
    ),
    "server_lr": Field(
        "server learning rate (unset: Flower's default, 1 for fedavgm, 0.1 for fedadam and "
        "fedadagrad, 0.01 for fedyogi)",
        float,
        lo=0.0,
        optional=True,
    ),
    "server_momentum": Field(
        "server momentum / beta1 (unset: 0 for fedavgm and fedadagrad, 0.9 for fedadam and "
        "fedyogi)",
        float,
        lo=0.0,
        hi=1.0,
        optional=True,
    ),
    "server_beta2": Field(
        "second-moment decay of fedadam and fedyogi (unset: 0.99)",
        float,
        lo=0.0,
        hi=1.0,
        optional=True,
    ),
    "server_tau": Field(
        "adaptivity tau of fedadam, fedyogi, fedadagrad (unset: 1e-9, 1e-3 for fedyogi)",
        float,
        lo=0.0,
        optional=True,
    ),
    "client_bits": Field(
        "heterogeneous clients: fractions of clients per uplink width, e.g. '2:0.5,4:0.3,8:0.2' "
        "(every quantized tensor of a client at its width, overriding --bits; seeded "
        "assignment); empty = every client uses --bits",
        str,
        check_fn=_client_bits_check,
    ),
    "mse_spread": Field.choice(
        "inverse-mse: weigh clients by 1 / (MSE + s^2), s^2 the clients' disagreement "
        "estimated from their decoded tensors (one more decoding pass), instead of 1 / MSE; "
        "auto = on with --client-bits",
        MseSpread,
    ),
    "bits": Field(
        "uplink bits: one width for all weight tensors ('8') or one per weight tensor in order "
        "('4-2-2-4'); 1..8, or 32 for float32; or 'auto:2.03': widths chosen per tensor and "
        "round to minimize the expected error at 2.03 bits per weight on average",
        str,
        check_fn=_bits_check,
    ),
    "rules": Field(
        "per-tensor overrides PATTERN=BITS, comma separated (e.g. 'fc2.*=8,*.bias=32')",
        str,
        check_fn=_rules_check,
    ),
    "method": Field("clipping-threshold rule", str, _choices(ThresholdMethod)),
    "rounding": Field("uplink rounding", str, _choices(Rounding)),
    "granularity": Field(
        "one threshold per tensor or per output channel", str, _choices(Granularity)
    ),
    "percentile": Field("percentile for --method percentile", float, lo=1e-9, hi=100.0),
    "rotation": Field(
        "rotate every uplink weight tensor with a seeded randomized Hadamard transform before "
        "clipping (near-Gaussian values, where OCTAV is near-optimal); the signs derive from "
        "(seed, round) and are never sent",
        bool,
    ),
    "entropy": Field(
        "entropy coding of the uplink codes ('rans': per tensor, only where it saves bytes)",
        str,
        _choices(EntropyCoding),
    ),
    "upload": Field.choice(
        "what clients quantize: their weights, or their update w_i - w_global ('delta'; the "
        "server adds the aggregate to its model; unquantized tensors still travel as values)",
        Upload,
    ),
    "error_feedback": Field(
        "with --upload delta: each client adds the quantization error of its previous upload "
        "to the next one (one float32 copy of the quantized tensors kept per client)",
        bool,
    ),
    "downlink_bits": Field(
        "downlink bits of the broadcast global model, same notation as --bits; 32 = float32",
        str,
        check_fn=_bits_check,
    ),
    "downlink_rounding": Field("downlink rounding", str, _choices(Rounding)),
    "aggregation": Field("server aggregation rule", str, _choices(AggregationRule)),
    "weight_cap": Field(
        "no client's aggregation weight for any tensor exceeds weight_cap times an equal "
        "share (1/m for m clients); 0 = no cap. Honest inverse-MSE weights on IID clients "
        "stay within ~1.4x an equal share, so the default 3 only binds for clients whose "
        "claimed MSE or dataset size is out of line",
        float,
        lo=0.0,
    ),
    "mse_floor": Field(
        "inverse-mse floor, relative to the median client MSE of a tensor", float, lo=0.0, hi=1.0
    ),
    "norm_bound": Field(
        "leave a client's update of a tensor (its model minus the global one, or its delta) "
        "out of the aggregate when it is longer than this many times the median client's; "
        "0 = no bound, else >= 1. The default never binds for honest clients",
        float,
        lo=0.0,
        check_fn=_norm_bound_check,
    ),
    "trim_fraction": Field(
        "--aggregation trimmed-mean: fraction of clients dropped from each end of every "
        "coordinate (below 0.5)",
        float,
        lo=0.0,
        check_fn=_half_open_check,
    ),
    "byzantine_fraction": Field(
        "--aggregation krum/multi-krum: fraction f/m of the round's clients assumed "
        "Byzantine (below 0.5; f is lowered to satisfy 2f + 2 < m)",
        float,
        lo=0.0,
        check_fn=_half_open_check,
    ),
    "min_clients": Field(
        "minimum number of valid replies for a round to update the model", int, lo=1
    ),
    "failure_rate": Field(
        "simulated probability that a client fails in a round", float, lo=0.0, hi=0.99
    ),
    "hostile_fraction": Field(
        "fraction of clients that are hostile or buggy (robustness experiments)",
        float,
        lo=0.0,
        hi=1.0,
    ),
    "hostile_mode": Field(
        "what hostile clients send: a payload-level fault, or a poisoned model (scale-1e3, "
        "scale-1e6, sign-flip, gaussian, alie; see fedquant.fl.adversary); 'mixed' cycles "
        "through the payload-level modes",
        str,
        ("mixed", *ADVERSARY_MODES, *ADVERSARY_ATTACKS),
    ),
    "eval_every": Field("evaluate the global model every k rounds (and after the last)", int, lo=1),
    "seed": Field("seed of every random stream (derived per round and client)", int, lo=0),
    "device": Field.choice("torch device for training and evaluation", Device),
    "threads": Field("torch threads (0 = torch's default)", int, lo=0),
    "batched_clients": Field(
        "train up to K clients at once as one stacked model (torch.func.vmap; same batches, "
        "results equal to the loop's up to float round-off); 0 = one after another. Models "
        "or options vmap cannot batch (--qat) fall back to the loop with a warning. Off by "
        "default: on a CPU it can be slower than the loop (python -m "
        "fedquant.tools.bench.batched measures it; docs/benchmarks.md)",
        int,
        lo=0,
    ),
    "out": Field("directory under which the results directory is created", str),
}

_defaults = {f.name for f in fields(RunConfig)}
if set(FIELDS) != _defaults:  # pragma: no cover - a developer error caught at import
    raise RuntimeError(f"FIELDS and RunConfig disagree: {set(FIELDS) ^ _defaults}")


def default_of(name: str) -> Any:
    f = next(f for f in fields(RunConfig) if f.name == name)
    return None if f.default is MISSING else f.default


#: fields that say where or how fast a run executes, not what it computes: ``--resume``
#: accepts a change of these (a moved data set, another device, more threads)
OPERATIONAL_FIELDS = frozenset(
    {"out", "data_root", "cache_dir", "device", "threads", "batched_clients"}
)


def config_differences(recorded: Mapping[str, Any], cfg: RunConfig) -> list[str]:
    """The fields of ``cfg`` that differ from ``recorded`` and change a run's results.

    ``recorded`` is a configuration as :meth:`RunConfig.to_dict` gave it (a key it
    lacks counts as that field's default). :data:`OPERATIONAL_FIELDS` and
    ``rounds`` (which a resumed run may raise to continue) are not compared.

    Returns
    -------
    list of str
        ``"name (recorded -> now)"`` for each differing field, in field order.
    """
    out = []
    for name, value in cfg.to_dict().items():
        if name in OPERATIONAL_FIELDS or name == "rounds":
            continue
        old = recorded.get(name, default_of(name))
        if old != value:
            out.append(f"{name} ({old!r} -> {value!r})")
    return out
