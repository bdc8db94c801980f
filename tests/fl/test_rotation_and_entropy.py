"""--rotation and --entropy end to end: options, the shared key's path, a short run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedquant.cli import main
from fedquant.errors import ConfigError, DecodeError
from fedquant.fl import adversary, seeding
from fedquant.fl.aggregation import aggregate_payloads
from fedquant.fl.config import RunConfig
from fedquant.fl.ingest import Reference, admit
from fedquant.fl.simulation import Simulation, final_accuracy
from fedquant.quant.codec import decode, describe_payload
from fedquant.quant.entropy import EntropyCoding
from fedquant.quant.spec import QuantSpec

# --------------------------------------------------------------------------- options


def test_options_are_in_help_and_validated(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--rotation, --no-rotation" in out
    assert "--entropy VALUE" in out and "one of: none, rans" in out
    assert main(["run", "--entropy", "zstd", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--entropy: 'zstd' is not valid; expected one of: none, rans" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["run", "--rotation", "--qat", "--out", str(tmp_path)]) == 2
    assert "cannot be combined with --qat" in capsys.readouterr().err


def test_config_builds_the_spec_and_round_trips() -> None:
    cfg = RunConfig(rotation=True, entropy="rans")
    spec = cfg.uplink_spec()
    assert spec.rotation and spec.entropy is EntropyCoding.RANS
    assert RunConfig.from_mapping({"quant": {"rotation": True, "entropy": "rans"}}) == cfg
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["rotation"] is True and spec.to_dict()["entropy"] == "rans"
    with pytest.raises(ConfigError, match="rotation: 'yes' is not valid; expected true or false"):
        RunConfig(rotation="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="entropy"):
        QuantSpec(entropy="gzip")  # type: ignore[arg-type]
    # the downlink stays unrotated and packed
    assert RunConfig(rotation=True, downlink_bits="8").downlink_spec().rotation is False  # type: ignore[union-attr]


def test_round_keys_are_shared_and_new_every_round() -> None:
    assert seeding.rotation_key(3, 1) == seeding.rotation_key(3, 1)
    assert len({seeding.rotation_key(3, r) for r in range(1, 50)}) == 49
    assert seeding.rotation_key(3, 1) != seeding.rotation_key(4, 1)
    assert 0 <= seeding.rotation_key(0, 0) < 1 << 64


# --------------------------------------------------------------------------- a short run


@pytest.fixture(scope="module")
def rotated_run() -> tuple[Simulation, Any, list[bytes]]:
    cfg = RunConfig(num_clients=2, rounds=2, seed=2, rotation=True, entropy="rans")
    sim = Simulation(cfg)
    seen: list[bytes] = []
    original = sim.client_payload

    def spy(*a: Any, **k: Any) -> Any:
        out = original(*a, **k)
        seen.append(out.payload)
        return out

    sim.client_payload = spy  # type: ignore[method-assign]
    return sim, sim.run(), seen


def test_a_rotated_entropy_coded_run_learns(rotated_run) -> None:  # type: ignore[no-untyped-def]
    _, state, seen = rotated_run
    # 2 rounds x 2 clients of the embedded MNIST subset at 4-2-2-4 bits: chance is 10 %
    assert final_accuracy(state.metrics) > 0.5
    assert all(r["clients_aggregated"] == 2 for r in state.metrics)
    assert state.metrics[0]["uplink_bytes"] == sum(len(p) for p in seen[:2])
    info = describe_payload(seen[0]).info
    assert [i.transform for i in info.values() if i.bits <= 8] == [1, 1, 1, 1]
    assert any(i.coding == 1 for i in info.values())  # fc1's 78,400 codes compress


def test_the_round_key_is_what_decodes_a_round(rotated_run) -> None:  # type: ignore[no-untyped-def]
    sim, _, seen = rotated_run
    cfg = sim.cfg
    round1, round2 = seen[:2], seen[2:4]
    k1, k2 = seeding.rotation_key(cfg.seed, 1), seeding.rotation_key(cfg.seed, 2)
    decode(round1[0], shared_key=k1)
    with pytest.raises(DecodeError, match="another shared key"):
        decode(round1[0], shared_key=k2)
    # the server refuses a replayed payload of an earlier round at admission
    ref = Reference.from_state(sim.initial_state)
    assert admit("0", round2[0], ref, shared_key=k2).ok
    late = admit("0", round1[0], ref, shared_key=k2)
    assert not late.ok and "another shared key" in late.reason
    agg = aggregate_payloads(round2, "mean", shared_key=k2)
    assert all(np.isfinite(v).all() for v in agg.tensors.values() if v.dtype.kind == "f")
    with pytest.raises(DecodeError, match="without the shared key"):
        aggregate_payloads(round2, "mean")


def test_hostile_clients_can_corrupt_rotated_payloads(rotated_run) -> None:  # type: ignore[no-untyped-def]
    sim, _, seen = rotated_run
    key = seeding.rotation_key(sim.cfg.seed, 1)
    ref = Reference.from_state(sim.initial_state)
    for mode in ("wrong-name", "wrong-shape", "wrong-dtype", "huge-examples", "nan-scale"):
        bad = adversary.corrupt(seen[0], mode, shared_key=key)
        assert isinstance(bad, bytes)
        if mode != "huge-examples":
            assert not admit("0", bad, ref, shared_key=key).ok, mode
