"""How the version-1 payload fixtures were made (run once with the code of main at b58c6e7,
before the wire format moved to CRC-32C; kept for the record, not run by the tests)."""

from __future__ import annotations

import numpy as np

import fedquant
from fedquant.quant.spec import QuantSpec

rng = np.random.default_rng(7)
t = {
    "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
    "fc1.weight": rng.laplace(size=(16, 40)).astype(np.float32),
    "fc2.weight": rng.standard_normal((10, 16)).astype(np.float32),
    "conv.bias": rng.standard_normal(4).astype(np.float32),
    "bn.num_batches_tracked": np.array(17, np.int64),
    "mask": np.array([True, False, True]),
}
specs = {
    "b4-stochastic-tensor": QuantSpec(default_bits=4, rounding="stochastic"),
    "b2-nearest-channel": QuantSpec(default_bits=2, rounding="nearest", granularity="channel"),
    "b8-stochastic-channel": QuantSpec(
        default_bits=8, rounding="stochastic", granularity="channel"
    ),
    "b3-nearest-rans": QuantSpec(default_bits=3, rounding="nearest", entropy="rans"),
    "b4-stochastic-rotated": QuantSpec(default_bits=4, rounding="stochastic", rotation=True),
}
out = {}
for name, spec in specs.items():
    p = fedquant.encode(t, spec, seed=11, meta={"round": 3, "client": 5}, shared_key=0x5EED)
    open(f"tests/quant/data/payload_v1_{name}.bin", "wb").write(p)
    d = fedquant.decode(p, shared_key=0x5EED)
    for k, v in d.tensors.items():
        out[f"{name}/{k}"] = v
np.savez("tests/quant/data/payload_v1_values.npz", **out)
print(sorted(out)[:3], len(out))
np.savez("tests/quant/data/payload_v1_inputs.npz", **t)
