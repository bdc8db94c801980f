"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): pure math.

The server treats the aggregate of a round as a *pseudo-gradient*

    D_t = x_bar - x_t

(``x_bar`` the model that plain aggregation would make the new global model,
``x_t`` the current one; with delta uploads ``x_bar - x_t`` is the aggregated
update itself) and takes one optimizer step with it:

``fedavgm``     ``m_t = b1 m_{t-1} + D_t``;  ``x_{t+1} = x_t + lr m_t``
``fedadagrad``  ``m_t = b1 m_{t-1} + (1 - b1) D_t``;  ``v_t = v_{t-1} + D_t^2``
``fedadam``     ``m_t`` as above;  ``v_t = b2 v_{t-1} + (1 - b2) D_t^2``
``fedyogi``     ``m_t`` as above;  ``v_t = v_{t-1} - (1 - b2) D_t^2 sign(v_{t-1} - D_t^2)``

and for the three adaptive ones ``x_{t+1} = x_t + lr m_t / (sqrt(v_t) + tau)``,
element-wise. ``m`` and ``v`` start at zero (as Flower's strategies do; the
paper asks ``v_{-1} >= tau^2``, which zero meets up to ``tau^2``). No bias
correction is applied (the paper's equations; Flower's ``FedAdam`` also
multiplies ``lr`` by Adam's bias correction, its ``FedYogi`` and
``FedAdagrad`` do not). ``none`` is plain aggregation: ``x_{t+1} = x_bar``.

Defaults (:data:`DEFAULTS`) are those of Flower 1.42's strategies:
``fedavgm`` lr 1, momentum 0 (i.e. FedAvg until a momentum is set);
``fedadam`` lr 0.1, b1 0.9, b2 0.99, tau 1e-9; ``fedyogi`` lr 0.01, b1 0.9,
b2 0.99, tau 1e-3; ``fedadagrad`` lr 0.1, b1 0, tau 1e-9.

Which tensors
-------------
The caller names the tensors the optimizer steps (the simulator: the model's
floating-point *parameters*); every other tensor -- BatchNorm running
statistics, ``num_batches_tracked`` and other buffers -- takes the aggregate
``x_bar`` unchanged. Running statistics are estimates of the data, not
descent directions: momentum or an adaptive step on them would make them
estimate nothing.

The arithmetic is float64; the new parameters are stored in the dtype of
``x_t``. The optimizer's state (``m``, ``v`` and the step count) is a flat
mapping of arrays (:meth:`ServerOptimizer.step` returns it), which the
simulator checkpoints with the model so that a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedquant.errors import ConfigError, InvalidInputError

__all__ = ["DEFAULTS", "SERVER_OPTIMIZERS", "ServerOptimizer", "ServerStep"]

#: server optimizer names (``none``: the aggregate is the new model)
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")

#: name -> (lr, momentum b1, b2, tau): Flower 1.42's defaults
DEFAULTS: dict[str, tuple[float, float, float, float]] = {
    "none": (1.0, 0.0, 0.0, 0.0),
    "fedavgm": (1.0, 0.0, 0.0, 0.0),
    "fedadam": (0.1, 0.9, 0.99, 1e-9),
    "fedyogi": (0.01, 0.9, 0.99, 1e-3),
    "fedadagrad": (0.1, 0.0, 0.0, 1e-9),
}

_STEP = "step"


@dataclass(frozen=True)
class ServerStep:
    """What :meth:`ServerOptimizer.step` returns: the new global ``model`` and the
    optimizer's ``state`` to pass to the next step."""

    model: dict[str, np.ndarray]
    state: dict[str, np.ndarray]


@dataclass(frozen=True)
class ServerOptimizer:
    """One server optimizer with its hyper-parameters (state is passed to :meth:`step`).

    Build it with :meth:`create`, which fills in the defaults.
    """

    name: str
    lr: float
    momentum: float
    beta2: float
    tau: float

    @classmethod
    def create(
        cls,
        name: str,
        *,
        lr: float | None = None,
        momentum: float | None = None,
        beta2: float | None = None,
        tau: float | None = None,
    ) -> ServerOptimizer:
        """The optimizer ``name``; a ``None`` hyper-parameter takes :data:`DEFAULTS`' value."""
        if name not in DEFAULTS:
            raise ConfigError(
                "server_optimizer",
                f"{name!r} is not valid; expected one of: {', '.join(SERVER_OPTIMIZERS)}",
            )
        d_lr, d_m, d_b2, d_tau = DEFAULTS[name]
        return cls(
            name,
            d_lr if lr is None else float(lr),
            d_m if momentum is None else float(momentum),
            d_b2 if beta2 is None else float(beta2),
            d_tau if tau is None else float(tau),
        )

    @property
    def active(self) -> bool:
        """False for ``none`` (the aggregate is taken as it is)."""
        return self.name != "none"

    def step(
        self,
        current: Mapping[str, np.ndarray],
        aggregate: Mapping[str, np.ndarray],
        names: Sequence[str],
        state: Mapping[str, np.ndarray],
    ) -> ServerStep:
        """One server step: the new model and the optimizer's new state.

        Parameters
        ----------
        current : mapping of str to ndarray
            The global model ``x_t``.
        aggregate : mapping of str to ndarray
            ``x_bar``: what plain aggregation makes the new model (same tensors).
        names : sequence of str
            The tensors the optimizer steps; the others take ``aggregate``.
        state : mapping of str to ndarray
            The state :meth:`step` returned last round (empty at the start).
        """
        if set(current) != set(aggregate):
            raise InvalidInputError(
                f"server optimizer: the aggregate's tensors {sorted(aggregate)} differ from the "
                f"model's {sorted(current)}"
            )
        out = {k: np.asarray(v) for k, v in aggregate.items()}
        if not self.active:
            return ServerStep(out, dict(state))
        new_state: dict[str, np.ndarray] = {
            _STEP: np.asarray(int(np.asarray(state.get(_STEP, 0))) + 1, dtype=np.int64)
        }
        b1, b2 = self.momentum, self.beta2
        for name in names:
            x = np.asarray(current[name])
            d = np.asarray(aggregate[name], dtype=np.float64) - x.astype(np.float64)
            m_prev = np.asarray(state.get(f"m/{name}", np.zeros_like(d)), dtype=np.float64)
            if self.name == "fedavgm":
                m = b1 * m_prev + d
                x_new = x + self.lr * m
            else:
                m = b1 * m_prev + (1.0 - b1) * d
                v_prev = np.asarray(state.get(f"v/{name}", np.zeros_like(d)), dtype=np.float64)
                d2 = d * d
                if self.name == "fedadagrad":
                    v = v_prev + d2
                elif self.name == "fedadam":
                    v = b2 * v_prev + (1.0 - b2) * d2
                else:  # fedyogi
                    v = v_prev - (1.0 - b2) * d2 * np.sign(v_prev - d2)
                new_state[f"v/{name}"] = v
                x_new = x + self.lr * m / (np.sqrt(v) + self.tau)
            new_state[f"m/{name}"] = m
            out[name] = np.asarray(x_new, dtype=x.dtype)
        return ServerStep(out, new_state)
