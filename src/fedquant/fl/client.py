"""A federated client: local training (optionally quantization-aware) and its upload.

Optimizer state between rounds: none is kept. Each round a client starts from
the global model it receives and a fresh SGD optimizer (momentum buffers start
at zero), the standard for stateless cross-device clients and what the paper's
reference code does. Clients therefore need no memory between rounds, and the
simulator holds one working model for all clients, not one per client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fedquant.errors import InvalidInputError, NonFiniteError
from fedquant.quant.allocation import plan_tensors
from fedquant.quant.codec import EncodeResult, encode_with_stats
from fedquant.quant.quantizer import fake_quantize
from fedquant.quant.spec import QuantSpec, TensorPlan


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings (the paper: 1 epoch, batch 64, SGD 0.01 / 0.9 / 1e-4)."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    qat: bool = False


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the last epoch
    num_examples: int
    seconds: float


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


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
    qat_spec: QuantSpec | None = None,
    qat_rng: np.random.Generator | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``(x, y)`` with SGD; mini-batch order from ``generator``.

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
    n = int(x.shape[0])
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
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
            order = torch.randperm(n, generator=generator)
            total, seen = 0.0, 0
            for b in range(0, n, cfg.batch_size):
                idx = order[b : b + cfg.batch_size]
                if idx.numel() < 2:
                    continue  # BatchNorm cannot train on a batch of one (see the docstring)
                xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise diverged(cfg, f"training loss {value}")
                total += value * idx.numel()
                seen += idx.numel()
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
        f"large for this model and data (momentum {cfg.momentum:g}); expected a smaller --lr"
    )


@torch.no_grad()
def check_finite_state(state: Mapping[str, torch.Tensor], cfg: TrainConfig) -> None:
    """Raise :func:`diverged` if a floating tensor of a trained ``state`` holds NaN/Inf."""
    bad = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise diverged(cfg, f"NaN/Inf in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``(x, y)``.

    Batches of 250 keep activations under glibc's 32 MB mmap threshold: larger
    batches made evaluation ~1.7x slower here (fresh page faults per batch).
    """
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for b in range(0, int(x.shape[0]), batch_size):
        xb, yb = x[b : b + batch_size].to(device), y[b : b + batch_size].to(device)
        out = model(xb)
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    n = max(int(x.shape[0]), 1)
    return loss_sum / n, correct / n


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
