"""Server-side aggregation rules: pure functions shared by the simulator and the Flower strategy.

Rules (:class:`AggregationRule`), per tensor ``l`` and client ``j``:

``fedavg``
    ``w_j = n_j / sum_k n_k`` -- the client discloses its number of examples.
``inverse-mse``
    ``w_lj = (1 / e_lj) / sum_k (1 / e_lk)`` where ``e_lj`` is the quantization
    MSE client ``j`` measured for tensor ``l`` and sent in its payload (arXiv
    2405.13365, Sec. IV). No dataset sizes are disclosed. The claimed MSE is
    not trusted blindly; two floors guard ``e -> 0``:

    * a floor from the client's own payload (:func:`plausible_mse`): a claim
      below ``PLAUSIBLE_FRACTION * D**2 / 12`` (``D`` its quantization step) is
      raised to it. Values spread over a step give about ``D**2 / 12`` (nearest
      rounding) or more (stochastic); weights that sit near the grid give less,
      honestly, and are then weighted as if they measured the floor;
    * a relative floor: ``e_lj <- max(e_lj, MSE_FLOOR_REL * median_k(e_lk),
      MSE_FLOOR_ABS)``, i.e. no client is weighted more than
      ``1 / MSE_FLOOR_REL = 100`` times a median client on the same tensor.

    Tensors that travel unquantized (float32 biases, BatchNorm, integer
    counters) have no quantization error (``e = 0`` for every client): the
    floor makes their weights equal, i.e. they are averaged with ``mean``.
``mean``
    ``w_j = 1 / m``.
``median``, ``trimmed-mean``
    Coordinate-wise median, or mean after dropping the ``floor(trim_fraction
    * m)`` largest and smallest values of each coordinate (Yin et al., ICML
    2018; :mod:`fedquant.fl.robust`).
``krum``, ``multi-krum``
    The client with the lowest Krum score, or the mean of the ``m - f``
    lowest (Blanchard et al., NeurIPS 2017), ``f`` the number of clients
    assumed Byzantine.

Before any rule, a client whose update of a floating tensor is longer than
``norm_bound`` times the median client's norm for that tensor is left out of
that tensor's aggregate (:func:`fedquant.fl.robust.outliers`; needs the
global model the clients started from, ``reference``). The default bound
never binds for honest clients, and it is what stops a client that sends a
finite but huge model.

With ``spread=True`` (:func:`aggregate_payloads`) inverse-MSE also accounts
for how much the clients' models differ: ``w_lj ~ 1 / (e_lj + s_l^2)`` where
``s_l^2`` (:func:`client_spread`) is the variance of the clients' true tensors
around their mean, estimated from the decoded payloads. Minimizing the
expected squared error of ``sum_j w_j x_hat_j`` as an estimate of the clients'
average model, with independent quantization noise of variance ``e_j`` and
client deviations of variance ``s^2``, gives exactly these weights: plain
inverse-MSE when the clients agree (``s^2 = 0``), equal weights when they
disagree far more than quantization perturbs them. It matters when clients
quantize at different widths: a 2-bit client's MSE is ~10^3 times an 8-bit
client's, so plain inverse-MSE all but drops its data.

Optionally every weight is capped at ``max_weight`` (then renormalized, the
excess spread over the others; see :func:`cap_weights`) so that no single
client can dominate a tensor.

Every parameter is aggregated -- BatchNorm statistics and biases included
(the paper's reference code copies those from one client instead). Integer
tensors are averaged and rounded to the nearest integer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

import numpy as np

from fedquant.choices import parse_choice
from fedquant.errors import ConfigError, InvalidInputError
from fedquant.fl import robust
from fedquant.fl.robust import NORM_BOUND, TRIM_FRACTION
from fedquant.fl.updates import DELTA, KIND_KEY, WEIGHTS, payload_delta_names
from fedquant.quant import codec, interop, kernels
from fedquant.quant.codec import DecodedUpdate, TensorInfo

MSE_FLOOR_REL = 1e-2
MSE_FLOOR_ABS = 1e-30
MSE_CEIL = 1e300
#: a claimed MSE below this fraction of the payload's own D**2/12 is raised to it
PLAUSIBLE_FRACTION = 0.1


def plausible_mse(info: TensorInfo) -> float:
    """The smallest MSE a payload's quantized tensor is weighted by (its claim's floor).

    ``PLAUSIBLE_FRACTION * mean_r(D_r**2) / 12`` over its rows' steps
    ``D_r = 2 s_r / (2**B - 1)``: uniform noise over a step has variance
    ``D**2/12``. Values spread over the range measure about that or more; values
    near the grid (a quantized model trained a few steps, rounded to nearest)
    honestly measure less, so this bounds what a claim buys and is not a test of
    honesty. 0 for unquantized tensors.
    """
    if not info.quantized or info.scales.size == 0:
        return 0.0
    if info.scales.size == 1:  # per tensor: the same float64 arithmetic without NumPy calls
        step = 2.0 * float(info.scales[0]) / ((1 << info.bits) - 1)
        return PLAUSIBLE_FRACTION * (step * step) / 12.0
    steps = 2.0 * info.scales.astype(np.float64) / ((1 << info.bits) - 1)
    return PLAUSIBLE_FRACTION * float(np.mean(steps * steps)) / 12.0


def floored_claims(
    info_list: Sequence[Mapping[str, TensorInfo]], names: Sequence[str]
) -> list[dict[str, float]]:
    """Each client's MSE claims, a claim below its :func:`plausible_mse` raised.

    A claim below the floor is raised to the larger of the floor and the (lower)
    median claim for that tensor: a client claiming 0 is weighted like a median client,
    not like the floor (which would buy it the weight cap). When most claims are
    low (honest clients near the grid, nearest rounding), the median is low too
    and they are all weighted as if they measured the floor.
    """
    medians: dict[str, float] = {}

    def median(n: str) -> float:  # the lower median: a client's own claim, no arithmetic
        if n not in medians:
            claims = np.array([info[n].mse for info in info_list], dtype=np.float64)
            medians[n] = float(np.quantile(claims, 0.5, method="lower"))
        return medians[n]

    out = []
    for info in info_list:
        row = {}
        for n in names:
            i = info[n]
            floor = plausible_mse(i)
            row[n] = i.mse if i.mse >= floor else max(floor, median(n))
        out.append(row)
    return out


class AggregationRule(str, Enum):
    """How the server weights client updates."""

    FEDAVG = "fedavg"
    INVERSE_MSE = "inverse-mse"
    MEAN = "mean"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed-mean"
    KRUM = "krum"
    MULTI_KRUM = "multi-krum"


#: rules that need every client's tensors at once (the others stream one client at a time)
ROBUST_RULES = (
    AggregationRule.MEDIAN,
    AggregationRule.TRIMMED_MEAN,
    AggregationRule.KRUM,
    AggregationRule.MULTI_KRUM,
)


def parse_rule(rule: AggregationRule | str) -> AggregationRule:
    """Normalize a rule name; :class:`ConfigError` names the allowed values."""
    try:
        return parse_choice(AggregationRule, rule, "aggregation")
    except InvalidInputError as e:
        raise ConfigError("aggregation", str(e).removeprefix("aggregation=")) from None


def cap_weights(w: np.ndarray, max_weight: float | None) -> np.ndarray:
    """Normalized weights with no entry above ``max_weight`` (water-filling).

    Entries above the cap are set to it and the remaining mass is shared by the
    others in proportion to their weights, repeatedly, until none exceeds it.
    A cap below ``1/m`` is infeasible and yields equal weights.
    """
    w = np.asarray(w, dtype=np.float64)
    w = w / w.sum()
    m = w.size
    if max_weight is None or max_weight >= 1.0 or m == 0:
        return w
    if max_weight * m <= 1.0:
        return np.full(m, 1.0 / m)
    capped = np.zeros(m, dtype=bool)
    for _ in range(m):
        over = (w > max_weight * (1 + 1e-12)) & ~capped
        if not over.any():
            break
        capped |= over
        free = 1.0 - max_weight * capped.sum()
        rest = w[~capped]
        w = np.where(capped, max_weight, 0.0)
        w[~capped] = rest / rest.sum() * free if rest.sum() > 0 else free / max(1, (~capped).sum())
    return w


def relative_cap(weight_cap: float, num_clients: int) -> float | None:
    """Absolute cap for ``weight_cap`` times an equal share (``0`` = no cap)."""
    if weight_cap <= 0 or num_clients <= 0:
        return None
    cap = weight_cap / num_clients
    return None if cap >= 1.0 else cap


def compute_weights(
    rule: AggregationRule | str,
    names: Sequence[str],
    *,
    mse: Sequence[Mapping[str, float]] | None = None,
    num_examples: Sequence[int] | None = None,
    num_clients: int | None = None,
    max_weight: float | None = None,
    mse_floor_rel: float = MSE_FLOOR_REL,
    spread: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Per-tensor client weights (each array sums to 1), in client order.

    Parameters
    ----------
    rule : {"fedavg", "inverse-mse", "mean"}
    names : sequence of str
        Tensor names to weight.
    mse : sequence of mapping, optional
        Per client, the per-tensor quantization MSE it reported (``inverse-mse``).
    num_examples : sequence of int, optional
        Per client, its number of training examples (``fedavg``).
    num_clients : int, optional
        Number of clients for ``mean`` if neither of the above is given.
    max_weight : float, optional
        Cap on any client's weight for any tensor (see :func:`cap_weights`).
    mse_floor_rel : float, default 1e-2
        Relative MSE floor (see the module docstring).
    spread : mapping of str to float, optional
        ``inverse-mse``: per tensor, the clients' spread ``s^2``
        (:func:`client_spread`), added to every client's floored MSE.
    """
    r = parse_rule(rule)
    if r in ROBUST_RULES:
        raise InvalidInputError(
            f"aggregate: {r.value!r} picks clients by their tensors, not by metadata; "
            "use aggregate_payloads"
        )
    m = (
        len(mse)
        if mse is not None
        else len(num_examples)
        if num_examples is not None
        else num_clients
    )
    if not m:
        raise InvalidInputError("aggregate: no client updates to aggregate")
    out: dict[str, np.ndarray] = {}
    if r is AggregationRule.FEDAVG:
        if num_examples is None or len(num_examples) != m:
            raise InvalidInputError("aggregate: fedavg needs num_examples for every client")
        n = np.asarray(num_examples, dtype=np.float64)
        if not np.isfinite(n).all() or (n < 0).any() or n.sum() <= 0:
            raise InvalidInputError(
                f"aggregate: num_examples must be >= 0 with a positive sum, got {list(num_examples)}"
            )
        base = cap_weights(n, max_weight)
        return {name: base for name in names}
    if r is AggregationRule.MEAN:
        base = np.full(m, 1.0 / m)
        return {name: base for name in names}
    if mse is None:
        raise InvalidInputError("aggregate: inverse-mse needs every client's per-tensor MSE")
    names = list(names)
    if not names:
        return out
    try:  # rows: tensors, columns: clients (each tensor's weights are computed on its own)
        e = np.array([[float(c[name]) for c in mse] for name in names], dtype=np.float64)
    except KeyError as err:
        raise InvalidInputError(
            f"aggregate: a client reported no MSE for tensor {err.args[0]!r}"
        ) from None
    bad = ~np.isfinite(e) | (e < 0)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise InvalidInputError(
            f"aggregate: MSE values for {names[row]!r} must be finite and >= 0, "
            f"got {e[row].tolist()}"
        )
    e = np.minimum(e, MSE_CEIL)  # claims near the float64 maximum would overflow the median
    floor = np.maximum(mse_floor_rel * np.median(e, axis=1), MSE_FLOOR_ABS)
    e = np.maximum(e, floor[:, None])
    if spread is not None:
        e = e + np.array([max(float(spread.get(name, 0.0)), 0.0) for name in names])[:, None]
    inv = 1.0 / e
    for row, name in enumerate(names):
        out[name] = cap_weights(inv[row], max_weight)
    return out


#: tensors of at most this many elements are accumulated together (see weighted_average)
SMALL_TENSOR = 1024


def weighted_average(
    updates: Iterable[Mapping[str, np.ndarray]],
    weights: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """``sum_j w_lj * x_lj`` per tensor, consuming ``updates`` one client at a time.

    Accumulates in float64; returns float32 for floating tensors and the
    original dtype (rounded) for integer ones. Memory: one accumulator per
    tensor, whatever the number of clients. Small tensors (biases, BatchNorm
    statistics: at most :data:`SMALL_TENSOR` elements) are laid end to end and
    accumulated with one weight vector, which spares two array operations per
    tensor and client; large ones are accumulated one by one. The arithmetic
    is the same either way: ``acc += w * x`` in float64, element by element,
    in client order.
    """
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    dtypes: list[np.dtype] = []
    big: list[int] = []  # positions (in names) of the tensors accumulated one by one
    small: list[int] = []  # positions of those accumulated together
    acc: dict[int, np.ndarray] = {}
    scratch: dict[int, np.ndarray] = {}
    small_sizes = np.zeros(0, dtype=np.int64)
    small_acc = small_scratch = np.zeros(0)
    cols: list[np.ndarray] = []
    count = 0
    for j, upd in enumerate(updates):
        if not names or list(upd) != names:
            if set(upd) != set(weights):
                missing = sorted(set(weights) - set(upd))
                extra = sorted(set(upd) - set(weights))
                raise InvalidInputError(
                    f"aggregate: client #{j} has missing tensors {missing} / unexpected tensors {extra}"
                )
        if not names and upd:
            names = list(upd)
            arrays = [np.asarray(upd[n]) for n in names]
            shapes = [a.shape for a in arrays]
            dtypes = [a.dtype for a in arrays]
            for i, a in enumerate(arrays):
                (small if a.size <= SMALL_TENSOR else big).append(i)
            for i in big:
                acc[i] = np.zeros(shapes[i], dtype=np.float64)
            small_sizes = np.array([arrays[i].size for i in small], dtype=np.int64)
            small_acc = np.zeros(int(small_sizes.sum()))
            small_scratch = np.empty_like(small_acc)
            cols = [np.asarray(weights[n], dtype=np.float64).reshape(-1) for n in names]
        else:
            arrays = [np.asarray(upd[n]) for n in names]
        for i, a in enumerate(arrays):
            if a.shape != shapes[i]:
                raise InvalidInputError(
                    f"aggregate: client #{j} sent {names[i]!r} with shape {a.shape}; "
                    f"expected {shapes[i]}"
                )
        count = j + 1
        short = next((i for i, c in enumerate(cols) if c.size <= j), None)
        if short is not None:  # more updates than this tensor has weights
            raise InvalidInputError(
                f"aggregate: {cols[short].size} weights for {names[short]!r} but at least "
                f"{count} updates"
            )
        for i in big:
            x = arrays[i]
            if x.dtype == np.float32 and x.flags.c_contiguous:  # decoded tensors: one pass
                kernels.accumulate_f32(acc[i], float(cols[i][j]), x)
            else:  # the float64 product, then the sum: the arithmetic of ``acc += w * x``
                if i not in scratch:
                    scratch[i] = np.empty(shapes[i], dtype=np.float64)
                acc[i] += np.multiply(cols[i][j], x, out=scratch[i])
        if small:
            x = np.concatenate([arrays[i].reshape(-1) for i in small], dtype=np.float64)
            w = np.repeat([cols[i][j] for i in small], small_sizes)
            small_acc += np.multiply(w, x, out=small_scratch)
    for name, wt in weights.items():
        if wt.size != count:
            raise InvalidInputError(
                f"aggregate: {wt.size} weights for {name!r} but {count} updates"
            )
    sums: dict[int, np.ndarray] = dict(acc)
    offsets = np.concatenate(([0], np.cumsum(small_sizes))).tolist()
    for k, i in enumerate(small):
        sums[i] = small_acc[offsets[k] : offsets[k + 1]].reshape(shapes[i])
    return {name: _cast_back(sums[i], dtypes[i]) for i, name in enumerate(names)}


def _cast_back(a: np.ndarray, dt: np.dtype) -> np.ndarray:
    """A float64 aggregate in the clients' dtype: float32 for floats, rounded for integers."""
    if dt.kind == "f":
        return np.asarray(a, dtype=np.float32)
    if dt.kind == "b":
        return np.asarray(a >= 0.5)
    info = np.iinfo(dt)
    # float64 cannot hold int64 extremes exactly: clip before the cast back
    hi = float(info.max)
    if int(hi) > info.max:  # int64: float(2**63 - 1) rounds up to 2**63
        hi = float(np.nextafter(hi, 0.0))
    r = np.clip(np.rint(a), float(info.min), hi)
    return np.asarray(r).astype(dt)


def client_spread(
    updates: Iterable[Mapping[str, np.ndarray]],
    mse: Sequence[Mapping[str, float]],
    names: Sequence[str],
) -> dict[str, float]:
    """Per tensor, ``s^2``: the variance of the clients' true values around their mean.

    ``V`` = the sample variance across clients of each decoded coordinate
    (Welford's running mean and sum of squares in float64, one client at a
    time), averaged over the tensor's coordinates; quantization adds each
    client's MSE to it on average, so ``s^2 = max(V - mean_j e_j, 0)``. 0 with
    fewer than two clients.
    """
    mean: dict[str, np.ndarray] = {}
    m2: dict[str, np.ndarray] = {}
    k = 0
    for k, upd in enumerate(updates, start=1):
        for name in names:
            x = np.asarray(upd[name], dtype=np.float64)
            if k == 1:
                mean[name], m2[name] = x.copy(), np.zeros_like(x)
                continue
            delta = x - mean[name]
            mean[name] += delta / k
            m2[name] += delta * (x - mean[name])
    if k < 2:
        return {name: 0.0 for name in names}
    out = {}
    for name in names:
        v = float(np.mean(m2[name])) / (k - 1) if m2[name].size else 0.0
        out[name] = max(v - float(np.mean([c[name] for c in mse])), 0.0)
    return out


@dataclass(frozen=True)
class AggregateResult:
    """The aggregated tensors, the weights used, and what each client's payload said."""

    tensors: dict[str, np.ndarray]
    #: per tensor, each client's weight; for ``median``/``trimmed-mean`` the nominal 1/m
    #: (every coordinate takes its value from whichever clients it does)
    weights: dict[str, np.ndarray]
    infos: list[dict[str, TensorInfo]]
    nbytes: int  # total uplink bytes of the aggregated payloads
    #: positions of the clients the norm bound left out of some tensor's aggregate
    dropped: tuple[int, ...] = ()

    def to_torch(self) -> dict[str, Any]:
        """The aggregate as torch tensors in the dtypes the clients sent (needs PyTorch).

        ``model.load_state_dict(result.to_torch())`` loads it.
        """
        dtypes = {n: i.dtype for n, i in self.infos[0].items()} if self.infos else {}
        return interop.to_torch(self.tensors, dtypes)


def aggregate_payloads(
    payloads: Sequence[bytes],
    rule: AggregationRule | str,
    *,
    num_examples: Sequence[int] | None = None,
    max_weight: float | None = None,
    mse_floor_rel: float = MSE_FLOOR_REL,
    inspected: Sequence[DecodedUpdate] | None = None,
    shared_key: int | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
    norm_bound: float = NORM_BOUND,
    trim_fraction: float = TRIM_FRACTION,
    byzantine: int | None = None,
    spread: bool = False,
) -> AggregateResult:
    """Decode client payloads and aggregate them with ``rule``.

    Two passes: :func:`~fedquant.quant.codec.describe_payload` reads every payload's
    per-tensor MSE (validating it fully), then payloads are dequantized and
    accumulated one at a time, so memory does not grow with the number of
    clients (the rules of :data:`ROBUST_RULES` hold every client's tensors at
    once instead). Raises :class:`~fedquant.errors.DecodeError` for a malformed
    payload and :class:`~fedquant.errors.InvalidInputError` for payloads that
    disagree on tensor names or shapes. ``inspected`` may pass the
    :func:`~fedquant.quant.codec.describe_payload` results of ``payloads`` (in order)
    the caller already has, e.g. from admission
    (:func:`fedquant.fl.ingest.admit`): they are then decoded with
    :func:`~fedquant.quant.codec.decode_inspected`, without a second parse.
    ``shared_key`` is the key for rotated tensors (payloads with rotated
    tensors need it). ``spread=True`` (``inverse-mse`` only) adds the
    clients' spread (:func:`client_spread`, one more decoding pass) to their
    MSE for every quantized tensor (see the module docstring).

    Parameters
    ----------
    reference : mapping of str to ndarray, optional
        The global model the clients started from. Needed by the norm bound
        (an update is a client's tensor minus this, or the tensor itself for
        the delta tensors of ``upload="delta"`` payloads); without it no
        update is bounded.
    norm_bound : float, default :data:`fedquant.fl.robust.NORM_BOUND`
        A client's update of a floating tensor longer than this many times the
        median client's norm for that tensor is left out (weight 0 on that
        tensor, the others renormalized and capped; the robust rules see a
        zero update); 0 = no bound, else at least 1. With the norm bound, the
        weight rules decode every payload twice (once for the norms), still one
        at a time.
    trim_fraction : float, default :data:`fedquant.fl.robust.TRIM_FRACTION`
        ``trimmed-mean`` drops ``floor(trim_fraction * m)`` values from each end.
    byzantine : int, optional
        ``f`` of ``krum``/``multi-krum`` (default:
        :func:`~fedquant.fl.robust.byzantine_count` of
        :data:`~fedquant.fl.robust.BYZANTINE_FRACTION`); lowered to the largest
        ``f`` with ``2 f + 2 < m``. ``multi-krum`` averages the ``m - f`` best.
    """
    if not payloads:
        raise InvalidInputError("aggregate: no client payloads to aggregate")
    r = parse_rule(rule)
    if inspected is None:
        inspected = [codec.describe_payload(p, shared_key=shared_key) for p in payloads]
    elif len(inspected) != len(payloads):
        raise InvalidInputError(
            f"aggregate: {len(inspected)} inspected updates for {len(payloads)} payloads"
        )
    info_list: list[dict[str, TensorInfo]] = [dict(u.info) for u in inspected]
    names = list(info_list[0])
    for j, info in enumerate(info_list[1:], start=1):
        if list(info) != names:
            raise InvalidInputError(
                f"aggregate: payload #{j} has tensors {list(info)}; payload #0 has {names}"
            )
        for n in names:
            if info[n].shape != info_list[0][n].shape:
                raise InvalidInputError(
                    f"aggregate: payload #{j} sent {n!r} with shape {info[n].shape}; "
                    f"payload #0 has {info_list[0][n].shape}"
                )
    m = len(inspected)
    nbytes = sum(len(p) for p in payloads)

    def decoded(j: int) -> dict[str, np.ndarray]:
        return codec.decode_inspected(inspected[j], shared_key=shared_key).tensors

    bound = _NormBound.make(inspected, info_list, reference, norm_bound)
    if r in ROBUST_RULES:
        clients = [decoded(j) for j in range(m)]
        dropped: tuple[int, ...] = ()
        if bound is not None:
            dropped = bound.measure(clients)
            clients = [bound.drop(j, t) for j, t in enumerate(clients)]
        if r in (AggregationRule.KRUM, AggregationRule.MULTI_KRUM):
            f = (
                robust.byzantine_count(m, robust.BYZANTINE_FRACTION)
                if byzantine is None
                else byzantine
            )
            if f < 0:
                raise InvalidInputError(f"aggregate: byzantine={f} must be >= 0")
            f = max(0, min(f, (m - 3) // 2))
            flat = np.stack(
                [
                    np.concatenate(
                        [np.asarray(t[n], dtype=np.float64).reshape(-1) for n in names]
                        + [np.zeros(0)]
                    )
                    for t in clients
                ]
            )
            keep = robust.krum_select(flat, f, 1 if r is AggregationRule.KRUM else m - f)
            w = np.zeros(m)
            w[keep] = 1.0 / keep.size
            weights = {n: w for n in names}
            tensors = weighted_average(clients, weights)
            return AggregateResult(tensors, weights, info_list, nbytes, dropped)
        k = robust.trim_count(m, trim_fraction) if r is AggregationRule.TRIMMED_MEAN else 0
        tensors = {}
        for n in names:
            stack = np.stack([np.asarray(t[n]) for t in clients])
            value = (
                robust.coordinate_median(stack)
                if r is AggregationRule.MEDIAN
                else robust.trimmed_mean(stack, k)
            )
            tensors[n] = _cast_back(value, stack.dtype)
        equal = np.full(m, 1.0 / m)
        return AggregateResult(tensors, {n: equal for n in names}, info_list, nbytes, dropped)

    mse = floored_claims(info_list, names)
    spreads = None
    if spread and parse_rule(rule) is AggregationRule.INVERSE_MSE:
        quantized = [n for n in names if any(info[n].quantized for info in info_list)]
        spreads = client_spread(
            (codec.decode_inspected(u, shared_key=shared_key).tensors for u in inspected),
            mse,
            quantized,
        )
    weights = compute_weights(
        r,
        names,
        mse=mse,
        num_examples=num_examples,
        max_weight=max_weight,
        mse_floor_rel=mse_floor_rel,
        spread=spreads,
    )
    dropped = ()
    if bound is not None:  # one pass for the norms; outliers get weight 0 on their tensors
        dropped = bound.measure(decoded(j) for j in range(m))
        weights = bound.reweight(weights, max_weight)
    tensors = weighted_average((decoded(j) for j in range(m)), weights)
    return AggregateResult(tensors, weights, info_list, nbytes, dropped)


@dataclass
class _NormBound:
    """The norm bound of one aggregation: which tensors, from where, and the outliers."""

    reference: Mapping[str, np.ndarray]
    names: list[str]  # the floating tensors
    deltas: frozenset[str]
    factor: float
    mask: np.ndarray | None = None  # (clients, tensors): outlier updates, after measure()

    @classmethod
    def make(
        cls,
        inspected: Sequence[DecodedUpdate],
        info_list: Sequence[Mapping[str, TensorInfo]],
        reference: Mapping[str, np.ndarray] | None,
        factor: float,
    ) -> _NormBound | None:
        if not np.isfinite(factor) or not (factor == 0 or factor >= 1):
            raise InvalidInputError(f"aggregate: norm_bound={factor!r} must be 0 (off) or >= 1")
        if reference is None or factor == 0:
            return None
        kinds = {str(u.meta.get(KIND_KEY, WEIGHTS)) for u in inspected}
        if len(kinds) > 1:
            raise InvalidInputError(
                f"aggregate: payloads mix uploads {sorted(kinds)}; expected one kind"
            )
        deltas = frozenset(payload_delta_names(info_list)) if kinds == {DELTA} else frozenset()
        names = [n for n, i in info_list[0].items() if i.dtype in _FLOAT_DTYPES]
        for n in names:
            if n not in reference or np.shape(reference[n]) != info_list[0][n].shape:
                got = np.shape(reference[n]) if n in reference else "nothing"
                raise InvalidInputError(
                    f"aggregate: the reference model has {got} for {n!r}; "
                    f"the payloads have shape {info_list[0][n].shape}"
                )
        return cls(reference, names, deltas, float(factor))

    def measure(self, clients: Iterable[Mapping[str, np.ndarray]]) -> tuple[int, ...]:
        """Find the outliers; returns the positions of the clients with any outlier update."""
        norms = [
            robust.tensor_update_norms(t, self.reference, self.names, self.deltas) for t in clients
        ]
        stacked = np.array(norms, dtype=np.float64).reshape(len(norms), len(self.names))
        self.mask = robust.outliers(stacked, self.factor)  # an overflowing norm is inf: outlier
        return tuple(int(j) for j in np.flatnonzero(self.mask.any(axis=1)))

    def reweight(
        self, weights: dict[str, np.ndarray], max_weight: float | None
    ) -> dict[str, np.ndarray]:
        """``weights`` with the outliers' weights 0, renormalized (and capped) per tensor."""
        assert self.mask is not None
        out = dict(weights)
        for t, n in enumerate(self.names):
            col = self.mask[:, t]
            if col.any():
                w = np.where(col, 0.0, weights[n])
                out[n] = (
                    cap_weights(w, max_weight)
                    if w.sum() > 0
                    else np.where(col, 0.0, 1.0 / (~col).sum())
                )
        return out

    def drop(self, j: int, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Client ``j``'s tensors with its outlier updates zeroed (the same dict if none is)."""
        assert self.mask is not None
        row = self.mask[j]
        if not row.any():
            return tensors
        names = [n for n, out in zip(self.names, row.tolist(), strict=True) if out]
        return robust.drop_updates(tensors, self.reference, names, self.deltas)


_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


#: the payload metadata key of a client's number of training examples (``fedavg``)
NUM_EXAMPLES_KEY = "num_examples"


def aggregate(
    payloads: Iterable[bytes | bytearray | memoryview],
    rule: AggregationRule | str = AggregationRule.INVERSE_MSE,
    *,
    num_examples: Sequence[int] | None = None,
    max_weight: float | None = None,
    shared_key: int | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
    norm_bound: float = NORM_BOUND,
    trim_fraction: float = TRIM_FRACTION,
    byzantine: int | None = None,
) -> AggregateResult:
    """Aggregate client payloads made by :func:`fedquant.encode` into one model update.

    Parameters
    ----------
    payloads : iterable of bytes
        One payload per client, all of the same tensors.
    rule : {"inverse-mse", "fedavg", "mean", "median", "trimmed-mean", "krum", \
"multi-krum"}, default "inverse-mse"
        How clients are combined (see the module docstring): weighted by the
        inverse of the quantization MSE each payload reports (the paper's
        rule), by number of examples, or equally; or a robust rule.
    num_examples : sequence of int, optional
        Per payload, the client's number of training examples; ``fedavg``
        only. If omitted, ``fedavg`` reads ``num_examples`` from each
        payload's metadata (``encode(..., meta={"num_examples": n})``).
    max_weight : float, optional
        Cap in (0, 1] on any client's weight for any tensor (e.g. ``3 / m``
        for at most three times an equal share of ``m`` clients).
    shared_key : int, optional
        The key of payloads whose tensors were rotated (``rotation=True``).
    reference, norm_bound, trim_fraction, byzantine
        The robust-aggregation options of :func:`aggregate_payloads`: pass the
        global model the clients started from as ``reference`` to leave out
        updates longer than ``norm_bound`` times the median client's (on by
        default when ``reference`` is given); ``trim_fraction`` for
        ``"trimmed-mean"``, ``byzantine`` (``f``) for ``"krum"``/``"multi-krum"``.

    Returns
    -------
    AggregateResult
        ``tensors``: NumPy arrays (float32 for floating tensors, the original
        dtype for integer ones); ``to_torch()`` gives a ``state_dict`` that
        ``model.load_state_dict`` accepts; ``weights``: the weight of each
        client for each tensor.

    Raises
    ------
    InvalidInputError
        No payloads, not bytes, payloads of different tensors or shapes, bad
        ``num_examples``/``max_weight``, ``fedavg`` without a number of
        examples for every client.
    ConfigError
        An unknown ``rule``.
    DecodeError
        A malformed payload.

    Examples
    --------
    >>> import numpy as np, fedquant
    >>> w = {"w": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)}
    >>> p = [fedquant.encode(w, meta={"num_examples": n}, seed=n) for n in (10, 30)]
    >>> fedquant.aggregate(p, "fedavg").weights["w"].tolist()
    [0.25, 0.75]
    """
    if isinstance(payloads, (bytes, bytearray, memoryview)):
        raise InvalidInputError(
            "aggregate: payloads is a single payload; expected a list of them, e.g. [p1, p2]"
        )
    try:
        payloads = list(payloads)
    except TypeError:
        raise InvalidInputError(
            f"aggregate: payloads is a {type(payloads).__name__}; expected a list of payloads "
            "(bytes from fedquant.encode)"
        ) from None
    for j, p in enumerate(payloads):
        if not isinstance(p, (bytes, bytearray, memoryview)):
            raise InvalidInputError(
                f"aggregate: payload #{j} is a {type(p).__name__}; expected bytes from "
                "fedquant.encode"
            )
    r = parse_rule(rule)
    if max_weight is not None and (
        isinstance(max_weight, bool)
        or not isinstance(max_weight, (int, float))
        or not 0.0 < max_weight <= 1.0
    ):
        raise InvalidInputError(
            f"aggregate: max_weight={max_weight!r} is not valid; expected a number in (0, 1] "
            "or None (no cap)"
        )
    if num_examples is not None:
        if r is not AggregationRule.FEDAVG:
            raise InvalidInputError(
                f"aggregate: num_examples weights clients under rule='fedavg' only; rule "
                f"{r.value!r} does not use it"
            )
        counts = list(num_examples) if isinstance(num_examples, Iterable) else None
        if counts is None or len(counts) != len(payloads) or not all(map(_is_count, counts)):
            raise InvalidInputError(
                f"aggregate: num_examples={num_examples!r} is not valid; expected one int >= 0 "
                f"per payload ({len(payloads)})"
            )
        num_examples = [int(n) for n in counts]
    if not payloads:
        raise InvalidInputError("aggregate: no client payloads to aggregate")
    inspected = [codec.describe_payload(p, shared_key=shared_key) for p in payloads]
    if r is AggregationRule.FEDAVG and num_examples is None:
        num_examples = []
        for j, u in enumerate(inspected):
            n = u.meta.get(NUM_EXAMPLES_KEY)
            if not _is_count(n):
                raise InvalidInputError(
                    f"aggregate: fedavg needs each client's number of examples, but payload #{j} "
                    f"has {NUM_EXAMPLES_KEY}={n!r} in its metadata; pass num_examples=[...] or "
                    f"encode with meta={{'{NUM_EXAMPLES_KEY}': n}}"
                )
            num_examples.append(int(n))  # type: ignore[arg-type]
    return aggregate_payloads(
        cast(Sequence[bytes], payloads),  # the codec reads any bytes-like payload
        r,
        num_examples=num_examples,
        max_weight=max_weight,
        inspected=inspected,
        shared_key=shared_key,
        reference=reference,
        norm_bound=norm_bound,
        trim_fraction=trim_fraction,
        byzantine=byzantine,
    )


def _is_count(n: object) -> bool:
    """An int >= 0 (a bool is not a count)."""
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and bool(n >= 0)
