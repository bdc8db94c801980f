"""Update quantization with error feedback: the pure functions, admission, the simulator, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedquant.errors import ConfigError, InvalidInputError
from fedquant.fl.config import RunConfig
from fedquant.fl.ingest import Reference, admit
from fedquant.fl.results import ResultsDir
from fedquant.fl.round import RoundRecord
from fedquant.fl.simulation import TIMING_KEYS, RunState, Simulation, final_accuracy
from fedquant.fl.updates import (
    DELTA,
    KIND_KEY,
    apply_delta,
    delta_names,
    encode_delta,
    make_delta,
    payload_delta_names,
    residual,
)
from fedquant.quant import codec
from fedquant.quant.spec import QuantSpec

SPEC = QuantSpec.from_strings(bits="2")


def model(seed: int = 0, shift: float = 0.0) -> dict[str, np.ndarray]:
    """A small state dict: two weights, a bias, BatchNorm statistics and a counter."""
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (rng.normal(size=(8, 4, 3, 3)) + shift).astype(np.float32),
        "conv.bias": rng.normal(size=8).astype(np.float32),
        "bn.running_mean": (rng.normal(size=8) + shift).astype(np.float32),
        "bn.num_batches_tracked": np.array(3 + seed, dtype=np.int64),
        "fc.weight": (rng.normal(size=(10, 72)) * 0.1 + shift).astype(np.float32),
    }


def strip(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in metrics]


# --------------------------------------------------------------------------- pure functions


def test_only_quantized_tensors_are_deltas() -> None:
    assert delta_names(SPEC, model()) == ("conv.weight", "fc.weight")
    with_rule = QuantSpec.from_strings(bits="2", rules="fc.*=32,conv.bias=4")
    assert delta_names(with_rule, model()) == ("conv.weight", "conv.bias")


def test_make_delta_and_apply_delta_invert_each_other() -> None:
    start, local = model(0), model(1, shift=0.5)
    names = delta_names(SPEC, start)
    u = make_delta(local, start, names)
    assert list(u) == list(local)  # order kept
    np.testing.assert_array_equal(u["conv.weight"], local["conv.weight"] - start["conv.weight"])
    for name in ("conv.bias", "bn.running_mean", "bn.num_batches_tracked"):
        assert u[name] is local[name] or np.array_equal(u[name], local[name])  # values
    back = apply_delta(start, u, names)
    for name, v in local.items():
        np.testing.assert_allclose(back[name], v, rtol=0, atol=1e-6)
        assert back[name].dtype == v.dtype
    # a residual is added to the deltas only; a missing entry counts as 0
    e = {"fc.weight": np.full((10, 72), 0.25, np.float32)}
    u2 = make_delta(local, start, names, e)
    np.testing.assert_array_equal(u2["fc.weight"], u["fc.weight"] + np.float32(0.25))
    np.testing.assert_array_equal(u2["conv.weight"], u["conv.weight"])


def test_update_function_errors() -> None:
    start = model(0)
    with pytest.raises(InvalidInputError, match=r"make_delta: tensors \['nope'\] are missing"):
        make_delta(start, start, ["nope"])
    with pytest.raises(InvalidInputError, match="apply_delta: the aggregate's tensors"):
        apply_delta(start, {"conv.weight": start["conv.weight"]}, ["conv.weight"])
    a = codec.describe_payload(codec.encode(start, SPEC, seed=0)).info
    b = codec.describe_payload(
        codec.encode(start, QuantSpec.from_strings(bits="2", rules="fc.*=32"), seed=0)
    ).info
    with pytest.raises(InvalidInputError, match="payload #1 quantizes"):
        payload_delta_names([a, b])
    assert payload_delta_names([a, a]) == ("conv.weight", "fc.weight")
    assert payload_delta_names([]) == ()


def test_residual_is_what_the_server_did_not_receive() -> None:
    start, local = model(0), model(1, shift=0.2)
    carried = {"conv.weight": np.full((8, 4, 3, 3), 0.1, np.float32)}
    up = encode_delta(
        local, start, SPEC, seed=5, meta={"round": 1}, residual_in=carried, error_feedback=True
    )
    assert up.result.meta == {"round": 1, KIND_KEY: DELTA}
    received = codec.decode(up.result.payload)
    assert received.meta[KIND_KEY] == DELTA
    u = make_delta(local, start, up.names, carried)
    # e = u - Q(u), with Q(u) exactly what the server decodes
    assert set(up.residual) == {"conv.weight", "fc.weight"}
    for name in up.names:
        np.testing.assert_array_equal(up.residual[name], u[name] - received.tensors[name])
        assert up.residual[name].dtype == np.float32
        assert np.abs(up.residual[name]).max() > 0  # 2 bits: something is always left
    assert residual(u, received.tensors, ["fc.weight"]).keys() == {"fc.weight"}
    # non-quantized tensors arrived as values, exactly
    for name in ("conv.bias", "bn.running_mean", "bn.num_batches_tracked"):
        np.testing.assert_array_equal(received.tensors[name], local[name])
    # without error feedback: no residual, and the carried one is ignored
    plain = encode_delta(local, start, SPEC, seed=5, residual_in=carried)
    assert plain.residual == {}
    np.testing.assert_array_equal(
        codec.decode(plain.result.payload).tensors["conv.bias"], local["conv.bias"]
    )


def test_error_feedback_keeps_the_transmitted_sum_on_track() -> None:
    """Sum of transmitted updates vs sum of true ones over 60 rounds.

    Nearest rounding at 2 bits is biased on a steady update, so without error
    feedback the gap grows linearly with the rounds; with it the gap is the
    current residual, which levels off.
    """
    rng = np.random.default_rng(0)
    base = (rng.normal(size=(32, 32)) * 0.01 + 0.003).astype(np.float32)
    spec = QuantSpec.from_strings(bits="2", rounding="nearest")
    start = {"w": np.zeros((32, 32), np.float32)}
    scale = float(np.linalg.norm(base))
    gaps: dict[bool, list[float]] = {}
    for ef in (True, False):
        noise = np.random.default_rng(1)
        e: dict[str, np.ndarray] | None = None
        sent = np.zeros((32, 32))
        true = np.zeros((32, 32))
        gaps[ef] = []
        for _ in range(60):
            g = base + (noise.normal(size=(32, 32)) * 0.002).astype(np.float32)
            up = encode_delta({"w": g}, start, spec, seed=0, residual_in=e, error_feedback=ef)
            e = up.residual
            sent += codec.decode(up.result.payload).tensors["w"]
            true += g
            gaps[ef].append(float(np.linalg.norm(sent - true)) / scale)
        if ef:  # the identity: what is missing from the sum is exactly the residual
            assert e is not None
            np.testing.assert_allclose(true - sent, e["w"], rtol=0, atol=1e-5 * scale)
    with_ef, without = np.array(gaps[True]), np.array(gaps[False])
    assert without[0] == pytest.approx(with_ef[0])  # round 1: nothing to feed back yet
    # without: linear growth, > 0.2 of one update's norm per round (measured 0.23)
    assert without[-1] > 0.2 * 60 and without[-1] > 0.9 * 3 * without[19]
    # with: bounded, levelling off (measured 2.0 at round 60; 2.6 after 200 rounds)
    assert with_ef.max() < 3.0
    assert with_ef[-1] - with_ef[39] < 0.5 * (with_ef[19] - with_ef[0])
    assert without[-1] > 5 * with_ef[-1]


# --------------------------------------------------------------------------- admission


def test_admission_refuses_the_other_kind_of_upload() -> None:
    start = model(0)
    ref = Reference.from_state(start)
    delta = encode_delta(model(1), start, SPEC, seed=1).result.payload
    weights = codec.encode(model(1), SPEC, seed=1)
    refused = admit("7", delta, ref)
    assert not refused.ok
    assert "payload carries 'delta' (metadata 'kind') but this server aggregates 'weights'" in (
        refused.reason
    )
    assert not admit("7", weights, ref, kind="delta").ok
    assert admit("7", delta, ref, kind="delta").ok
    assert admit("7", weights, ref).ok


def test_config_validates_the_new_options() -> None:
    assert RunConfig().upload == "weights" and RunConfig().error_feedback is False
    with pytest.raises(
        ConfigError, match=r"^upload: 'diff' is not valid; expected one of: weights, delta$"
    ):
        RunConfig(upload="diff")
    with pytest.raises(
        ConfigError, match=r"^error_feedback: needs upload='delta' \(got 'weights'\)"
    ):
        RunConfig(error_feedback=True)
    with pytest.raises(ConfigError, match=r"^qat: fake-quantizes the weights, but upload='delta'"):
        RunConfig(qat=True, upload="delta")
    with pytest.raises(ConfigError, match="error_feedback: 1 is not valid; expected true or false"):
        RunConfig(upload="delta", error_feedback=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- simulator

EF = dict(num_clients=4, rounds=4, seed=3, client_fraction=0.5, upload="delta", error_feedback=True)


@pytest.fixture(scope="module")
def ef_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Simulation, RunState, ResultsDir]:
    """The whole run, and the checkpoint it wrote after round 2."""
    sim = Simulation(RunConfig(**EF))  # type: ignore[arg-type]
    rd = ResultsDir(tmp_path_factory.mktemp("ef"))

    def on_round(st: RunState, _: RoundRecord) -> None:
        if st.round == 2:
            rd.write_round(st.round, st.global_state, st.metrics, residuals=st.residuals)

    return sim, sim.run(on_round=on_round), rd


def test_delta_upload_with_error_feedback_learns(ef_run) -> None:  # type: ignore[no-untyped-def]
    sim, state, _ = ef_run
    # 4 rounds x 2 of 4 clients at 4-2-2-4 bits: chance is 10 %
    assert final_accuracy(state.metrics) > 0.6
    # every client that took part keeps a float32 residual of the quantized tensors only
    took_part = {int(c) for r in range(1, 5) for c in sim.sample_clients(r)}
    assert set(state.residuals) == took_part and len(took_part) >= 3
    for res in state.residuals.values():
        assert list(res) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
        assert all(v.dtype == np.float32 and np.abs(v).max() > 0 for v in res.values())
    assert all(r["clients_rejected"] == 0 for r in state.metrics)


def test_resume_with_residuals_equals_an_uninterrupted_run(ef_run) -> None:  # type: ignore[no-untyped-def]
    _, whole, rd = ef_run
    cfg = RunConfig(**EF)  # type: ignore[arg-type]
    ck = rd.read_checkpoint()
    assert ck is not None and ck.round == 2 and ck.residuals
    for c, res in ck.residuals.items():
        assert list(res) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
        assert all(v.dtype == np.float32 for v in res.values()) and c in range(4)
    resumed = Simulation(cfg).run(
        RunState(
            round=ck.round,
            global_state=ck.global_state,
            metrics=ck.metrics,
            residuals=ck.residuals,
        )
    )
    assert strip(resumed.metrics) == json.loads(json.dumps(strip(whole.metrics)))
    for k in whole.global_state:
        assert np.array_equal(resumed.global_state[k], whole.global_state[k])
    # the residuals matter: resuming without them, round 3 already ends elsewhere
    forgetful = Simulation(cfg.with_(rounds=3)).run(
        RunState(round=ck.round, global_state=ck.global_state, metrics=ck.metrics)
    )
    assert forgetful.metrics[-1]["test_loss"] != whole.metrics[2]["test_loss"]


def test_cli_resume_carries_the_residuals(ef_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`fedquant run --upload delta --error-feedback`, stopped after round 1 and resumed,
    equals the uninterrupted in-process run: metrics, model and residuals."""
    from fedquant.cli import main

    _, whole, _ = ef_run
    args = ["run", "--num-clients", "4", "--client-fraction", "0.5", "--seed", "3"]
    args += ["--upload", "delta", "--error-feedback", "--quiet", "--out", str(tmp_path)]
    assert main([*args, "--rounds", "1"]) == 0
    (run,) = tmp_path.iterdir()
    config = run / "config.toml"
    # only the line 'rounds = 1' ('lr_step_rounds = 10' must stay as it is)
    config.write_text(re.sub(r"(?m)^rounds = 1$", "rounds = 4", config.read_text()))
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(rows) == json.loads(json.dumps(strip(whole.metrics)))
    # deterministic: another Simulation, in two goes, ends bit for bit where the fixture did
    ck = ResultsDir(run).read_checkpoint()
    assert ck is not None and ck.round == 4
    for k in whole.global_state:
        assert np.array_equal(ck.global_state[k], whole.global_state[k])
    assert ck.residuals.keys() == whole.residuals.keys()
    for c in whole.residuals:
        for k in whole.residuals[c]:
            assert np.array_equal(ck.residuals[c][k], whole.residuals[c][k])


def test_cli_refuses_error_feedback_without_delta(capsys: pytest.CaptureFixture[str]) -> None:
    from fedquant.cli import main

    assert main(["run", "--error-feedback", "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedquant run: error: --error-feedback: needs upload='delta'")
    assert "\n" not in err
