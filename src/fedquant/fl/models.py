"""Models: the CNN of arXiv 2405.13365 and helpers for any ``torch.nn.Module``.

The paper's CNN (its authors' reference code)::

    conv3x3(C->16, padding 1, no bias) - BN - tanh - maxpool 2
    conv3x3(16->16, padding 1, no bias) - BN - tanh - maxpool 2
    fc(16 * H/4 * W/4 -> 100) - BN - tanh
    fc(100 -> classes) - BN  -> log-softmax

For 28x28x1 inputs its four weight tensors hold 144 + 2,304 + 78,400 + 1,000 =
81,848 values (the paper's per-layer bits "4-2-2-4" apply to them in this
order). The second convolution has no bias either: BatchNorm follows it, so a
bias would be redundant.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedquant.errors import ConfigError
from fedquant.fl.models_text import CharTransformer


class PaperCNN(nn.Module):
    """The paper's small CNN for ``(channels, height, width)`` inputs (H, W divisible by 4)."""

    def __init__(self, in_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        c, h, w = in_shape
        if h % 4 or w % 4:
            raise ConfigError(
                "model", f"PaperCNN needs height and width divisible by 4, got {in_shape}"
            )
        self.conv1 = nn.Conv2d(c, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * (h // 4) * (w // 4), 100)
        self.bn3 = nn.BatchNorm1d(100)
        self.fc2 = nn.Linear(100, num_classes)
        self.bn4 = nn.BatchNorm1d(num_classes)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.tanh(self.bn1(self.conv1(x))))
        x = self.pool(torch.tanh(self.bn2(self.conv2(x))))
        x = torch.tanh(self.bn3(self.fc1(x.flatten(1))))
        return torch.log_softmax(self.bn4(self.fc2(x)), dim=1)


#: model names the CLI accepts -> factory(in_shape, num_classes)
MODELS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "paper-cnn": lambda shape, k: PaperCNN(shape, k),
    # byte windows of shape (context,), num_classes = the vocabulary
    "char-transformer": lambda shape, k: CharTransformer(vocab_size=k, context=shape[-1]),
}


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Instantiate a registered model; ``ConfigError`` names the allowed names."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ConfigError(
            "model", f"{name!r} is unknown; expected one of: {', '.join(MODELS)}"
        ) from None
    return factory(in_shape, num_classes)


def float32_state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict with floating tensors as float32 (the uncompressed upload)."""
    total = 0
    for t in model.state_dict().values():
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total
