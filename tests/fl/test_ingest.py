"""Server-side admission of payloads."""

from __future__ import annotations

import numpy as np

from fedquant.fl.ingest import Reference, admit
from fedquant.quant.codec import encode
from fedquant.quant.spec import QuantSpec

STATE = {"w": np.ones((4, 5), np.float32), "b": np.zeros(4, np.float32), "n": np.array(3, np.int64)}


def test_admits_a_good_payload_and_rejects_duplicates() -> None:
    ref = Reference.from_state(STATE)
    p = encode(STATE, QuantSpec(default_bits=2), seed=0)
    seen: set[str] = set()
    a = admit("7", p, ref, seen=seen)
    assert a.ok and a.update is not None and list(a.update.info) == ["w", "b", "n"]
    b = admit("7", p, ref, seen=seen)
    assert not b.ok and b.reason == "duplicate client id in this round"


def test_rejections_name_the_reason(caplog) -> None:  # type: ignore[no-untyped-def]
    ref = Reference.from_state(STATE)
    good = encode(STATE, QuantSpec(default_bits=2), seed=0)
    cases = {
        "oversized": (
            good + b"\0" * 10,
            f"payload of {len(good) + 10} bytes exceeds the limit of {len(good) + 5}",
        ),
        "corrupt": (good[:-1] + bytes([good[-1] ^ 1]), "checksum mismatch"),
        "names": (
            encode({"x": STATE["w"], "b": STATE["b"], "n": STATE["n"]}, QuantSpec(), seed=0),
            "missing ['w'], unexpected ['x']",
        ),
        "shape": (
            encode({**STATE, "w": np.ones((5, 4), np.float32)}, QuantSpec(), seed=0),
            "'w' has shape (5, 4); the model's is (4, 5)",
        ),
        "dtype": (
            encode({**STATE, "n": np.array(3.0, np.float32)}, QuantSpec(), seed=0),
            "'n' has dtype float32",
        ),
        "type": ("not bytes", "payload is str"),
    }
    for client, (payload, reason) in cases.items():
        limit = len(good) + 5 if client == "oversized" else None
        a = admit(client, payload, ref, max_bytes=limit)  # type: ignore[arg-type]
        assert not a.ok, client
        assert reason in a.reason, (client, a.reason)
    assert "rejected update from client corrupt: decode: checksum mismatch" in caplog.text
