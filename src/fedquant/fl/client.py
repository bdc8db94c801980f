"""A federated client: local training (optionally quantization-aware) and its upload.

Optimizer state between rounds: none is kept. Each round a client starts from
the global model it receives and a fresh optimizer (SGD momentum buffers and
Adam moments start at zero), the standard for stateless cross-device clients
and what the paper's reference code does. Clients therefore need no memory between rounds, and the
simulator holds one working model for all clients, not one per client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from fedquant.errors import InvalidInputError, NonFiniteError
from fedquant.fl.task import (
    CLIENT_OPTIMIZERS,
    ClientOptimizer,
    Task,
    TrainConfig,
    TrainStats,
    evaluate,
    iter_batches,
)
from fedquant.quant.allocation import plan_tensors
from fedquant.quant.codec import EncodeResult, encode_with_stats
from fedquant.quant.quantizer import fake_quantize
from fedquant.quant.spec import QuantSpec, TensorPlan

__all__ = [
    "TrainConfig",
    "TrainStats",
    "encode_model",
    "evaluate",
    "load_numpy_state",
    "make_optimizer",
    "proximal_term",
    "state_numpy",
    "train_local",
    "upload_meta",
]


class _FakeQuantSTE(nn.Module):
    """Parametrization: the forward pass sees ``Q(w)``, gradients flow to ``w`` unchanged.

    ``Q`` is the same quantizer the codec uses (:func:`fedquant.quant.quantizer.fake_quantize`),
    so the model trains against exactly the error its upload will carry.
    """

    def __init__(self, plan: TensorPlan, rng: np.random.Generator) -> None:
        super().__init__()
        self.plan = plan
        self.rng = rng

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = fake_quantize(
            w.detach(),
            self.plan.bits,
            method=self.plan.method,
            rounding=self.plan.rounding,
            granularity=self.plan.granularity,
            percentile=self.plan.percentile,
            seed=self.rng,
        )
        return w + (torch.from_numpy(q).to(w.device, w.dtype) - w).detach()


def _attach_qat(
    model: nn.Module, spec: QuantSpec, rng: np.random.Generator
) -> list[tuple[nn.Module, str, list[str]]]:
    state = model.state_dict()
    plans = spec.resolve({k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()})
    if spec.bit_budget is not None:  # bits="auto:B": widths allocated from the starting weights
        plans = plan_tensors(state_numpy(model), spec)
    attached = []
    for module_name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{pname}" if module_name else pname
            plan = plans.get(full)
            if plan is not None and plan.quantized and p.is_floating_point():
                order = list(module._parameters)
                parametrize.register_parametrization(module, pname, _FakeQuantSTE(plan, rng))
                attached.append((module, pname, order))
    return attached


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The client optimizer ``cfg.optimizer`` over ``params`` at ``cfg.lr``."""
    if cfg.optimizer == ClientOptimizer.SGD:
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == ClientOptimizer.ADAM:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == ClientOptimizer.ADAMW:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise InvalidInputError(
        f"train_local: optimizer {cfg.optimizer!r} is unknown; expected one of: "
        + ", ".join(CLIENT_OPTIMIZERS)
    )


def proximal_term(model: nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``(mu / 2) * sum ||w - w_anchor||^2`` over the model's parameters."""
    total = sum(
        ((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters() if name in anchor
    )
    return 0.5 * mu * torch.as_tensor(total)


def train_local(
    model: nn.Module,
    data: Dataset,
    task: Task,
    cfg: TrainConfig,
    generator: torch.Generator,
    *,
    global_params: Mapping[str, torch.Tensor] | None = None,
    qat_spec: QuantSpec | None = None,
    qat_rng: np.random.Generator | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``data`` for ``task``; mini-batch order from ``generator``.

    With :attr:`Task.train` set, that function does the training. Otherwise the
    generic loop: ``cfg.epochs`` passes over ``data`` in shuffled mini-batches
    (:func:`~fedquant.fl.task.iter_batches`; a last batch of one sample is
    skipped), each a step of ``cfg.optimizer`` on ``task.loss(model, batch)``
    plus, with ``cfg.prox_mu > 0``, FedProx's proximal term towards
    ``global_params`` (default: the model's parameters on entry).

    With ``cfg.qat`` the layers ``qat_spec`` quantizes are fake-quantized in the
    forward pass (straight-through estimator); the float weights are what
    remains in the model afterwards.

    A mini-batch of one example is skipped: BatchNorm's batch statistics are
    undefined for it (the batch size is never reached when ``n % batch_size ==
    1``, and a client with a single example leaves the model as it got it).

    Raises
    ------
    NonFiniteError
        If training diverges (a NaN/Inf loss, or NaN/Inf weights afterwards);
        the message names the learning rate.
    """
    start = time.perf_counter()
    if task.train is not None:
        stats = task.train(model, data, cfg, generator)
        if not isinstance(stats, TrainStats):
            raise InvalidInputError(
                f"task {task.name!r}: train() returned {type(stats).__name__}, expected TrainStats"
            )
        return stats
    n = len(data)  # type: ignore[arg-type]
    opt = make_optimizer(list(model.parameters()), cfg)
    anchor: Mapping[str, torch.Tensor] | None = None
    if cfg.prox_mu > 0:
        anchor = (
            {k: v.detach().clone() for k, v in model.named_parameters()}
            if global_params is None
            else global_params
        )
    attached: list[tuple[nn.Module, str, list[str]]] = []
    if cfg.qat:
        if qat_spec is None or qat_rng is None:
            raise InvalidInputError("train_local: qat=True needs qat_spec and qat_rng")
        attached = _attach_qat(model, qat_spec, qat_rng)
    model.train()
    device = next(model.parameters()).device
    last = 0.0
    try:
        for _ in range(cfg.epochs):
            total, seen = 0.0, 0
            for size, batch in iter_batches(
                data,
                cfg.batch_size,
                device,
                generator=generator,
                collate=task.collate,
                drop_single=True,
            ):
                opt.zero_grad(set_to_none=True)
                loss = task.loss(model, batch)
                objective = (
                    loss if anchor is None else loss + proximal_term(model, anchor, cfg.prox_mu)
                )
                objective.backward()
                opt.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise diverged(cfg, f"training loss {value}")
                total += value * size
                seen += size
            last = total / max(seen, 1)
        check_finite_state(model.state_dict(), cfg)
    finally:
        for module, pname, param_order in attached:
            parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
            # removal re-registers the parameter last; restore the state-dict order
            module._parameters = {k: module._parameters[k] for k in param_order}
    return TrainStats(loss=last, num_examples=n, seconds=time.perf_counter() - start)


def diverged(cfg: TrainConfig, what: str) -> NonFiniteError:
    """The error of a local training run that diverged (``what`` says how it showed)."""
    return NonFiniteError(
        f"local training diverged ({what}): the learning rate lr={cfg.lr:g} is likely too "
        f"large for this model and data (optimizer {cfg.optimizer}); expected a smaller --lr"
    )


@torch.no_grad()
def check_finite_state(state: Mapping[str, torch.Tensor], cfg: TrainConfig) -> None:
    """Raise :func:`diverged` if a floating tensor of a trained ``state`` holds NaN/Inf."""
    bad = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise diverged(cfg, f"NaN/Inf in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")


def state_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as CPU NumPy arrays (floats as float32)."""
    out = {}
    for k, v in model.state_dict().items():
        if v.is_cpu and v.dtype is torch.float32:  # the common case: a view (state_dict detaches)
            out[k] = v.numpy()
            continue
        t = v.detach().to("cpu")
        out[k] = (t.float() if t.is_floating_point() else t).numpy()
    return out


#: torch dtypes with a NumPy twin (``Tensor.numpy()`` works)
_NUMPY_DTYPES = frozenset(
    {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16}
    | {torch.int8, torch.uint8, torch.bool}
)


def load_numpy_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load NumPy arrays into ``model`` (dtype and device follow the model's tensors).

    A CPU tensor whose dtype and size the array already has is filled with
    :func:`numpy.copyto` (a plain memcpy): torch's ``copy_`` runs even small
    copies as a parallel region, which cost milliseconds per model when the
    other cores are busy.
    """
    current = model.state_dict()
    missing = set(current) - set(state)
    unexpected = set(state) - set(current)
    if missing or unexpected:
        raise InvalidInputError(
            f"load_numpy_state: state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    with torch.no_grad():
        for k, t in current.items():
            arr = np.asarray(state[k])
            if t.is_cpu and t.dtype in _NUMPY_DTYPES and t.is_contiguous():
                dst = t.numpy()
                if arr.dtype == dst.dtype and arr.size == dst.size:
                    np.copyto(dst, arr.reshape(dst.shape))
                    continue
            src = torch.from_numpy(np.ascontiguousarray(arr))
            t.copy_(src.to(t.device, t.dtype).reshape(t.shape))


def upload_meta(
    round_: int, client: int, *, disclose_num_examples: int | None = None
) -> dict[str, int]:
    """The metadata a client's upload carries: round and client id, and its number of
    examples only when the server aggregates with FedAvg (which needs it). Used by the
    simulator and the Flower mod alike, so both produce the same bytes."""
    meta = {"round": int(round_), "client": int(client)}
    if disclose_num_examples is not None:
        meta["num_examples"] = int(disclose_num_examples)
    return meta


def encode_model(
    model: nn.Module,
    spec: QuantSpec,
    *,
    seed: np.random.SeedSequence,
    meta: Mapping[str, Any] | None = None,
    shared_key: int | None = None,
) -> EncodeResult:
    """Encode the model's full state with the codec (the upload).

    ``shared_key`` is the round's rotation key (specs that rotate need it).
    """
    return encode_with_stats(state_numpy(model), spec, seed=seed, meta=meta, shared_key=shared_key)
