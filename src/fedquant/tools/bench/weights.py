"""Real weights for the error benchmark: the paper's CNN, trained *centrally*, or any state dict.

The weights the paper quantizes come from federated training (the federated
benchmarks, :mod:`fedquant.tools.bench.federated`, run the simulator itself). The
error benchmark uses the paper's CNN (:class:`fedquant.fl.models.PaperCNN`) trained centrally -- one
model, the whole training split, the paper's optimizer (SGD, lr 0.01,
momentum 0.9, weight decay 1e-4, batch 64) -- for a few epochs. Weights trained this way
have the shapes and roughly the statistics of federated ones, not the same
values; every report says so.

A training run is seeded and cached as an ``.npz`` file (no pickle), keyed by
data set, epochs and seed, together with a JSON sidecar holding the test
accuracy and the settings. :func:`load_state` accepts a mapping of tensors or
a checkpoint path (``.npz``, or a ``.pt``/``.pth`` state dict read with
``torch.load(weights_only=True)``), so any trained model can be benchmarked.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.errors import DataError, InvalidInputError
from fedquant.quant.spec import QuantSpec

#: the data sets the benchmark trains on, with the loader name and default epochs
TRAIN_SETS: dict[str, tuple[str, int]] = {
    "mnist": ("mnist-embedded", 5),
    "cifar10": ("cifar10-jpeg", 2),
}


@dataclass(frozen=True)
class TrainInfo:
    """How a benchmark model was trained and how good it is."""

    dataset: str
    epochs: int
    seed: int
    train_examples: int
    test_accuracy: float
    seconds: float
    note: str = "trained centrally (not federated) by fedquant.tools.bench.weights"


def _as_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach") and hasattr(v, "numpy"):
        t = v.detach().to("cpu")
        return (t.float() if t.is_floating_point() else t).numpy()
    return np.asarray(v)


def load_state(state: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A state dict as NumPy arrays, from a mapping or a checkpoint file.

    Raises
    ------
    DataError
        The file is missing or is not an ``.npz``/``.pt``/``.pth`` state dict.
    """
    if isinstance(state, Mapping):
        return {str(k): _as_numpy(v) for k, v in state.items()}
    path = Path(state)
    if not path.is_file():
        raise DataError(f"load_state: {path} does not exist; expected an .npz or .pt state dict")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.suffix in (".pt", ".pth"):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise DataError(f"load_state: {path} is not a readable torch state dict: {e}") from e
        if not isinstance(obj, Mapping):
            raise DataError(f"load_state: {path} holds a {type(obj).__name__}, not a state dict")
        return {str(k): _as_numpy(v) for k, v in obj.items()}
    raise DataError(f"load_state: {path} has suffix {path.suffix!r}; expected .npz, .pt or .pth")


def quantizable_layers(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors fedquant quantizes by default (floating, >= 2 dims): conv and linear weights."""
    return {
        k: np.ascontiguousarray(v, dtype=np.float32)
        for k, v in state.items()
        if QuantSpec.is_quantizable(tuple(v.shape), np.asarray(v).dtype.kind == "f")
    }


def train_paper_cnn(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 0.01,
) -> tuple[dict[str, np.ndarray], float]:
    """Train :class:`~fedquant.fl.models.PaperCNN` centrally; returns (state, test accuracy).

    The paper's optimizer: SGD with momentum 0.9 and weight decay 1e-4, batch
    64. Seeded: the initialization and the batch order come from ``seed``.
    """
    import torch
    import torch.nn.functional as F

    from fedquant.fl.models import PaperCNN

    x, y = torch.as_tensor(train_x), torch.as_tensor(train_y)
    in_shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    num_classes = int(max(int(y.max()), int(torch.as_tensor(test_y).max())) + 1)
    torch.manual_seed(seed)
    model = PaperCNN(in_shape, max(num_classes, 2))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    n = int(x.shape[0])
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(0, n, batch_size):
            idx = order[b : b + batch_size]
            if idx.numel() < 2:
                continue  # BatchNorm needs two samples
            opt.zero_grad(set_to_none=True)
            F.nll_loss(model(x[idx]), y[idx]).backward()  # the model ends in log-softmax
            opt.step()
    model.eval()
    tx, ty = torch.as_tensor(test_x), torch.as_tensor(test_y)
    correct = 0
    with torch.no_grad():
        for b in range(0, int(tx.shape[0]), 250):
            correct += int((model(tx[b : b + 250]).argmax(1) == ty[b : b + 250]).sum())
    acc = correct / max(int(tx.shape[0]), 1)
    return _numpy_state(model), acc


def _numpy_state(model: Any) -> dict[str, np.ndarray]:
    return {k: _as_numpy(v) for k, v in model.state_dict().items()}


def trained_weights(
    dataset: str,
    cache_dir: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], TrainInfo]:
    """The paper's CNN trained centrally on ``dataset`` ("mnist" or "cifar10"), cached.

    Parameters
    ----------
    dataset : {"mnist", "cifar10"}
        ``"mnist"`` uses the embedded 5,000-image MNIST subset (no files needed);
        ``"cifar10"`` the CIFAR-10 JPEG folder or tarball at ``root``.
    cache_dir : path
        Where ``paper-cnn-<dataset>-e<epochs>-s<seed>.npz`` and its ``.json`` go.
    root : path, optional
        The data for ``"cifar10"`` (see :func:`fedquant.fl.data.load_dataset`).
    epochs : int, optional
        Default 5 for MNIST, 2 for CIFAR-10.
    seed : int, default 0

    Raises
    ------
    InvalidInputError
        Unknown ``dataset``.
    DataError
        The data cannot be loaded (e.g. CIFAR-10 without ``root``).
    """
    if dataset not in TRAIN_SETS:
        raise InvalidInputError(
            f"trained_weights: dataset={dataset!r} is unknown; expected one of: "
            f"{', '.join(TRAIN_SETS)}"
        )
    loader, default_epochs = TRAIN_SETS[dataset]
    epochs = default_epochs if epochs is None else int(epochs)
    cdir = Path(cache_dir)
    stem = cdir / f"paper-cnn-{dataset}-e{epochs}-s{seed}"
    npz, meta = stem.with_suffix(".npz"), stem.with_suffix(".json")
    if npz.is_file() and meta.is_file():
        try:
            info = TrainInfo(**json.loads(meta.read_text()))
            return load_state(npz), info
        except (TypeError, ValueError, DataError, OSError):
            pass  # a stale or corrupt cache entry: train again
    from fedquant.fl.data import load_dataset, to_tensors

    start = time.perf_counter()
    data = to_tensors(load_dataset(loader, root=root))
    state, acc = train_paper_cnn(
        data.train_x, data.train_y, data.test_x, data.test_y, epochs=epochs, seed=seed
    )
    info = TrainInfo(
        dataset=loader,
        epochs=epochs,
        seed=seed,
        train_examples=int(data.train_x.shape[0]),
        test_accuracy=acc,
        seconds=time.perf_counter() - start,
    )
    cdir.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".tmp.npz")
    np.savez(tmp, **state)  # type: ignore[arg-type]
    os.replace(tmp, npz)
    meta.write_text(json.dumps(asdict(info), indent=1))
    return state, info
