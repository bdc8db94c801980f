"""Train several clients' models at once: one stacked model under ``torch.func.vmap``.

:func:`train_batched` is :func:`fedquant.fl.client.train_local` for ``K``
clients in one pass. The ``K`` copies of the model's parameters and buffers
are stacked along a new leading dimension, and every step runs
``torch.func.functional_call`` of the model under ``torch.func.vmap``, so the
``K`` forward and backward passes become one batched pass (convolutions become
grouped convolutions, linear layers batched matrix products).

What is the same as the loop, step for step
-------------------------------------------
* **Mini-batches.** Client ``k``'s batches come from ``torch.randperm(n_k,
  generator=generators[k])`` per epoch, cut into ``batch_size`` slices, the last
  one partial; a batch of one sample is skipped (BatchNorm cannot train on
  it), exactly as ``train_local`` does. Clients of different sizes take
  different numbers of steps, and their last batches differ in size: at every
  step the clients that still train are grouped by batch size, one vmapped pass
  per group; a client that has finished is not touched (its parameters, running
  statistics and momentum stay as they are).
* **BatchNorm.** Each client's running mean, variance and ``num_batches_tracked``
  are rows of the stacked buffers, updated in place by ``batch_norm`` under
  vmap with torch's own formula; batch statistics are per client.
* **SGD.** The update is ``torch.optim.SGD``'s (single-tensor path, the one
  torch uses for CPU tensors) in the same order of operations: ``d = g + wd *
  w``; ``buf = momentum * buf + d``; ``w -= lr * buf``. Parameters without a
  gradient are skipped, as SGD skips them.
* **Optimizer state** is handled as ``train_local`` handles it: none is kept
  between rounds; each call starts every client with momentum buffers at zero.
  (SGD's first step sets ``buf = d``; ``0 * momentum + d`` is the same number.)
* **Loss**: the reported loss is the mean training loss of the last epoch,
  weighted by batch size, as in ``train_local``.

The results agree with the loop up to float round-off only: a batched
(grouped) convolution or matrix product sums in another order than the
per-client one, and SGD carries the differences along. Mostly they stay near
1e-7 relative per step; the largest is in the first convolution's weight
gradient on 28x28 inputs (a sum over batch x 784 positions), where the loop's
own float32 result differs from a float64 reference by ~3e-4 relative and the
batched one by ~5e-6. After one round of the default run the trained weights of
the two differ by up to ~6e-4 absolute there (conv1), <= 7e-6 elsewhere. Two
batched runs with the same generators agree exactly on the same machine.

What is not batched (:func:`unsupported_reason` says why, and callers fall
back to the loop): quantization-aware training (the straight-through
fake-quantization draws from a NumPy generator inside the forward pass),
models with shared (tied) parameters or parametrizations, and models whose
forward pass does not run under ``vmap`` (random layers such as dropout,
data-dependent Python control flow, ``.item()`` calls, BatchNorm with
``momentum=None``). A model that keeps Python-side state in its forward pass
would see it shared by all clients; such models should use the loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils import parametrize

from fedquant.errors import InvalidInputError
from fedquant.fl.client import TrainConfig, TrainStats, check_finite_state

__all__ = ["BatchedResult", "state_to_numpy", "train_batched", "unsupported_reason"]


@dataclass(frozen=True)
class BatchedResult:
    """What :func:`train_batched` returns, one entry per client in the order given.

    Attributes
    ----------
    states : list of dict of str to torch.Tensor
        Each client's trained state dict (keys and order of ``model.state_dict()``).
    stats : list of TrainStats
        Each client's loss and number of examples; ``seconds`` is the call's wall
        time divided equally among the clients.
    """

    states: list[dict[str, torch.Tensor]]
    stats: list[TrainStats]


def state_to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A state dict as CPU NumPy arrays, floats as float32 (as :func:`~fedquant.fl.client.state_numpy`)."""
    out = {}
    for k, v in state.items():
        t = v.detach().to("cpu")
        out[k] = (t.float() if t.is_floating_point() else t).numpy()
    return out


def _structure_reason(model: nn.Module, cfg: TrainConfig) -> str | None:
    if cfg.qat:
        return (
            "qat: quantization-aware training fake-quantizes the weights with a NumPy "
            "generator inside the forward pass, which vmap cannot batch"
        )
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        return "the model has parametrized parameters (torch.nn.utils.parametrize)"
    if len(list(model.named_parameters(remove_duplicate=False))) != len(
        list(model.named_parameters())
    ) or len(list(model.named_buffers(remove_duplicate=False))) != len(list(model.named_buffers())):
        return "the model shares (ties) parameters or buffers between modules"
    return None


def unsupported_reason(model: nn.Module, cfg: TrainConfig, example_x: torch.Tensor) -> str | None:
    """Why ``model`` cannot be trained by :func:`train_batched` with ``cfg``, or ``None``.

    Besides the structural checks (QAT, tied or parametrized parameters) this
    runs one batched training step of two clients on the first two rows of
    ``example_x`` (copies of the model's state; the model is not changed), so a
    forward pass that fails under ``vmap`` is reported here, not in round 1.
    """
    reason = _structure_reason(model, cfg)
    if reason is not None:
        return reason
    if example_x.shape[0] < 2:
        return None  # no two rows to try: a vmap error would surface in train_batched
    device = next(model.parameters()).device
    x = example_x[:2].to(device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    params, buffers = _stack(model, 2)
    momentum_bufs = _momentum_buffers(params, cfg)
    was_training = model.training
    try:
        model.train()
        _step(model, params, buffers, torch.stack([x, x]), torch.stack([y, y]), momentum_bufs, cfg)
    except Exception as e:  # what a foreign model raises under vmap is not ours to know
        return f"the model does not train under torch.func.vmap ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    return None


def _stack(model: nn.Module, k: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``k`` copies of the model's parameters and buffers, stacked on a new dim 0."""
    params = {
        n: p.detach().unsqueeze(0).repeat(k, *([1] * p.dim())) for n, p in model.named_parameters()
    }
    buffers = {
        n: b.detach().unsqueeze(0).repeat(k, *([1] * b.dim())) for n, b in model.named_buffers()
    }
    return params, buffers


def _momentum_buffers(
    params: dict[str, torch.Tensor], cfg: TrainConfig
) -> dict[str, torch.Tensor] | None:
    """SGD's momentum buffers at zero (``None`` without momentum)."""
    return {n: torch.zeros_like(p) for n, p in params.items()} if cfg.momentum != 0 else None


def _step(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    xb: torch.Tensor,
    yb: torch.Tensor,
    momentum_bufs: dict[str, torch.Tensor] | None,
    cfg: TrainConfig,
) -> list[float]:
    """One SGD step of the ``G`` clients whose stacked state is ``params``/``buffers``.

    ``xb`` is ``(G, B, ...)``, ``yb`` ``(G, B)``. Parameters, BatchNorm buffers
    and ``momentum_bufs`` are updated in place; returns the ``G`` batch losses.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    leaves = {
        n: (p.detach().requires_grad_() if n in trainable else p.detach())
        for n, p in params.items()
    }

    def loss_of(
        p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, b), (x,)), y)

    losses = vmap(loss_of)(leaves, buffers, xb, yb)
    names = [n for n in leaves if n in trainable]
    grads = torch.autograd.grad(
        losses.sum(), [leaves[n] for n in names], allow_unused=True, materialize_grads=False
    )
    with torch.no_grad():
        for n, g in zip(names, grads, strict=True):
            if g is None:  # SGD skips parameters without a gradient
                continue
            p = params[n]
            d = g.add(p, alpha=cfg.weight_decay) if cfg.weight_decay != 0 else g
            if momentum_bufs is not None:
                buf = momentum_bufs[n]
                buf.mul_(cfg.momentum).add_(d, alpha=1)  # dampening 0, as train_local's SGD
                d = buf
            p.add_(d, alpha=-cfg.lr)
    return [float(v) for v in losses.detach().cpu()]


def _schedule(
    sizes: Sequence[int], cfg: TrainConfig, generators: Sequence[torch.Generator]
) -> list[list[tuple[int, torch.Tensor]]]:
    """Per client, its (epoch, sample indices) steps in ``train_local``'s order."""
    plans: list[list[tuple[int, torch.Tensor]]] = []
    for n, gen in zip(sizes, generators, strict=True):
        steps = []
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for b in range(0, n, cfg.batch_size):
                idx = order[b : b + cfg.batch_size]
                if idx.numel() < 2:
                    continue  # BatchNorm cannot train on a batch of one (as train_local)
                steps.append((epoch, idx))
        plans.append(steps)
    return plans


def train_batched(
    model: nn.Module,
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    *,
    generators: Sequence[torch.Generator],
) -> BatchedResult:
    """Train ``len(data)`` clients from ``model``'s current state at once.

    Parameters
    ----------
    model : torch.nn.Module
        The starting (global) model, the same for every client. Only its mode
        changes (it is left in training mode, as ``train_local`` leaves it);
        its parameters and buffers are not modified.
    data : sequence of (x, y)
        Each client's training set; sizes may differ.
    cfg : TrainConfig
        As for ``train_local``; ``cfg.qat`` is not supported (see
        :func:`unsupported_reason`).
    generators : sequence of torch.Generator
        One per client: its mini-batch order, consumed exactly as ``train_local``
        consumes it (one ``randperm`` per epoch).

    Returns
    -------
    BatchedResult
        The clients' trained states and statistics, in the order of ``data``.

    Raises
    ------
    InvalidInputError
        If the counts of ``data`` and ``generators`` differ, or the model is
        not supported (the message gives :func:`unsupported_reason`'s reason).
    """
    start = time.perf_counter()
    k = len(data)
    if len(generators) != k:
        raise InvalidInputError(
            f"train_batched: {k} clients' data but {len(generators)} generators; expected one each"
        )
    reason = _structure_reason(model, cfg)
    if reason is not None:
        raise InvalidInputError(f"train_batched: not supported: {reason}; use train_local")
    if k == 0:
        return BatchedResult(states=[], stats=[])
    device = next(model.parameters()).device
    sizes = [int(x.shape[0]) for x, _ in data]
    plans = _schedule(sizes, cfg, generators)
    params, buffers = _stack(model, k)
    momentum_bufs = _momentum_buffers(params, cfg)
    totals = np.zeros((k, cfg.epochs))
    seen = np.zeros((k, cfg.epochs), dtype=np.int64)
    model.train()
    for t in range(max((len(s) for s in plans), default=0)):
        groups: dict[int, list[int]] = {}
        for c in range(k):
            if t < len(plans[c]):
                groups.setdefault(int(plans[c][t][1].numel()), []).append(c)
        for bsize in sorted(groups):
            members = groups[bsize]
            xb = torch.stack([data[c][0][plans[c][t][1]] for c in members]).to(device)
            yb = torch.stack([data[c][1][plans[c][t][1]] for c in members]).to(device)
            if len(members) == k:  # everyone: work on the stacked state in place
                losses = _step(model, params, buffers, xb, yb, momentum_bufs, cfg)
            else:  # a subgroup: gather its rows, step, scatter them back
                rows = torch.tensor(members, device=device)
                sub_p = {n: v.index_select(0, rows) for n, v in params.items()}
                sub_b = {n: v.index_select(0, rows) for n, v in buffers.items()}
                sub_m = (
                    {n: v.index_select(0, rows) for n, v in momentum_bufs.items()}
                    if momentum_bufs is not None
                    else None
                )
                losses = _step(model, sub_p, sub_b, xb, yb, sub_m, cfg)
                for full, sub in ((params, sub_p), (buffers, sub_b), (momentum_bufs, sub_m)):
                    if full is not None and sub is not None:
                        for n, v in sub.items():
                            full[n].index_copy_(0, rows, v)
            for c, loss in zip(members, losses, strict=True):
                epoch = plans[c][t][0]
                totals[c, epoch] += loss * bsize
                seen[c, epoch] += bsize
    keys = list(model.state_dict())
    states = []
    for c in range(k):
        merged = {**{n: v[c] for n, v in params.items()}, **{n: v[c] for n, v in buffers.items()}}
        states.append({n: merged[n].clone() for n in keys})
        check_finite_state(states[-1], cfg)
    share = (time.perf_counter() - start) / k
    stats = [
        TrainStats(
            loss=float(totals[c, -1] / max(int(seen[c, -1]), 1)),
            num_examples=sizes[c],
            seconds=share,
        )
        for c in range(k)
    ]
    return BatchedResult(states=states, stats=stats)
