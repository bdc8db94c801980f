"""A client's local-training settings (torch-free, so the run configuration can build on it)."""

from __future__ import annotations

from dataclasses import dataclass

from fedquant.choices import StrChoice

__all__ = ["CLIENT_OPTIMIZERS", "ClientOptimizer", "TrainConfig"]


class ClientOptimizer(StrChoice):
    """The clients' local optimizer (its state starts fresh every round)."""

    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


#: local optimizers :func:`fedquant.fl.client.train_local` builds
CLIENT_OPTIMIZERS = tuple(o.value for o in ClientOptimizer)


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings of one round (the paper: 1 epoch, batch 64, SGD 0.01 / 0.9 / 1e-4).

    Attributes
    ----------
    epochs, batch_size : int
    lr : float
        This round's learning rate (the simulator applies the schedule over rounds).
    momentum : float
        SGD momentum (``sgd`` only; Adam's betas are torch's defaults).
    weight_decay : float
        L2 penalty (``sgd``, ``adam``) or decoupled decay (``adamw``).
    qat : bool
        Quantization-aware training (straight-through estimator).
    optimizer : {"sgd", "adam", "adamw"}
        The client optimizer; its state starts fresh every round.
    prox_mu : float
        FedProx (Li et al., MLSys 2020): ``(prox_mu / 2) * ||w - w_start||^2`` is
        added to every mini-batch loss, ``w_start`` the model the client received.
    """

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    qat: bool = False
    optimizer: ClientOptimizer = ClientOptimizer.SGD
    prox_mu: float = 0.0
