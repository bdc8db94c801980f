"""The inputs of the golden version-2 payloads in ``tests/quant/data`` (``payload_v2_*``).

The values are exact binary fractions computed with integer arithmetic, so the
inputs are the same on every platform. Regenerate the files only for a
deliberate change of the wire format (``python -m tests.quant.golden``), and
say so in the commit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedquant.quant.codec import encode
from fedquant.quant.spec import QuantSpec

DATA = Path(__file__).parent / "data"
SEED = (4, 2)
SHARED_KEY = 0x5EED
META = {"round": 4, "client": 2, "note": "golden"}
SPECS = {
    "b4-stochastic-channel": QuantSpec(
        default_bits=4, rounding="stochastic", granularity="channel"
    ),
    "b2-nearest-tensor-max": QuantSpec(default_bits=2, rounding="nearest", method="max"),
    "b3-nearest-rans": QuantSpec(default_bits=3, rounding="nearest", entropy="rans"),
    "b8-stochastic-rotated": QuantSpec(default_bits=8, rounding="stochastic", rotation=True),
    "mixed-rules": QuantSpec.from_strings(bits="6-5-1", rules="fc.bias=8", rounding="nearest"),
}


def _grid(shape: tuple[int, ...], a: int, m: int) -> np.ndarray:
    """Values ``((a * i) % m - m // 2) / 16`` for ``i = 0, 1, ...``: exact in float32."""
    i = np.arange(int(np.prod(shape)), dtype=np.int64)
    return (((a * i) % m - m // 2) / 16.0).astype(np.float32).reshape(shape)


def _sparse(shape: tuple[int, ...]) -> np.ndarray:
    """Mostly zeros, every 3rd value from :func:`_grid` (codes skewed enough for rANS)."""
    x = _grid(shape, 5, 9)
    x.reshape(-1)[np.arange(x.size) % 3 != 0] = 0.0
    return x


def inputs() -> dict[str, np.ndarray]:
    """A small state dict: three weights, a bias, an integer counter, a bool mask, a 0-d value."""
    return {
        "embed.weight": _sparse((32, 16)),
        "conv.weight": _grid((3, 2, 2, 2), 37, 101),
        "fc.weight": _grid((5, 7), 11, 29),
        "fc.bias": _grid((5,), 3, 7),
        "bn.num_batches_tracked": np.array(17, np.int64),
        "mask": np.array([True, False, True]),
        "temperature": np.array(0.5, np.float32),
    }


def encode_golden(name: str) -> bytes:
    """The payload of ``SPECS[name]`` over :func:`inputs` (what the golden file holds)."""
    return encode(inputs(), SPECS[name], seed=SEED, meta=META, shared_key=SHARED_KEY)


def path(name: str) -> Path:
    return DATA / f"payload_v2_{name}.bin"


if __name__ == "__main__":  # regenerate (a deliberate format change only)
    from fedquant.quant.codec import decode

    values = {}
    for spec_name in SPECS:
        payload = encode_golden(spec_name)
        path(spec_name).write_bytes(payload)
        for k, v in decode(payload, shared_key=SHARED_KEY).tensors.items():
            values[f"{spec_name}/{k}"] = v
    np.savez(DATA / "payload_v2_values.npz", **values)
