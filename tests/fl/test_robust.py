"""Robust aggregation: each rule against a slow reference, the norm bound, the attacks."""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest

from fedquant.errors import ConfigError, InvalidInputError
from fedquant.fl import adversary, robust
from fedquant.fl.aggregation import aggregate_payloads, compute_weights
from fedquant.fl.config import RunConfig
from fedquant.fl.simulation import Simulation
from fedquant.fl.updates import encode_delta
from fedquant.quant.codec import decode, encode
from fedquant.quant.spec import QuantSpec

RAW = QuantSpec(default_bits=32)  # payloads that decode to exactly what was encoded
GLOBAL = {
    "w": np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32),
    "b": np.zeros(4, np.float32),
    "n": np.array(7, np.int64),
}


def client(seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": GLOBAL["w"] + scale * rng.standard_normal((6, 5)).astype(np.float32),
        "b": GLOBAL["b"] + scale * rng.standard_normal(4).astype(np.float32),
        "n": np.array(7 + seed, np.int64),
    }


def payloads(states: list[dict[str, np.ndarray]], spec: QuantSpec = RAW) -> list[bytes]:
    return [encode(s, spec, seed=i) for i, s in enumerate(states)]


# --------------------------------------------------------------------------- slow references


def ref_median(values: list[float]) -> float:
    v = sorted(values)
    m = len(v)
    return v[m // 2] if m % 2 else (v[m // 2 - 1] + v[m // 2]) / 2


def ref_trimmed(values: list[float], k: int) -> float:
    v = sorted(values)[k : len(values) - k]
    return sum(v) / len(v)


def ref_krum_scores(rows: list[list[float]], f: int) -> list[float]:
    m = len(rows)
    out = []
    for i in range(m):
        d = sorted(
            sum((a - b) ** 2 for a, b in zip(rows[i], rows[j], strict=True))
            for j in range(m)
            if j != i
        )
        out.append(sum(d[: max(1, m - f - 2)]))
    return out


def coordinatewise(stack: np.ndarray, fn) -> np.ndarray:  # type: ignore[no-untyped-def]
    flat = stack.reshape(stack.shape[0], -1)
    return np.array([fn(list(map(float, flat[:, i]))) for i in range(flat.shape[1])]).reshape(
        stack.shape[1:]
    )


@pytest.mark.parametrize("m", [1, 2, 5, 6])
def test_median_and_trimmed_mean_match_slow_references(m: int) -> None:
    stack = np.random.default_rng(m).standard_normal((m, 3, 4))
    assert np.allclose(robust.coordinate_median(stack), coordinatewise(stack, ref_median))
    for k in range((m + 1) // 2):
        got = robust.trimmed_mean(stack, k)
        assert np.allclose(got, coordinatewise(stack, lambda v, k=k: ref_trimmed(v, k)))
    with pytest.raises(InvalidInputError, match="cannot drop"):
        robust.trimmed_mean(stack, (m + 1) // 2 if m > 1 else 1)


def test_trim_and_byzantine_counts() -> None:
    assert robust.trim_count(10, 0.3) == 3
    assert robust.trim_count(10, 0.29) == 2
    assert robust.trim_count(3, 0.45) == 1
    assert robust.trim_count(2, 0.49) == 0
    assert robust.byzantine_count(10, 0.3) == 3  # 2*3 + 2 < 10
    assert robust.byzantine_count(7, 0.45) == 2  # lowered from 3: 2*3 + 2 = 8 >= 7
    assert robust.byzantine_count(3, 0.3) == 0
    with pytest.raises(InvalidInputError, match=r"trim fraction 0\.5 must be in \[0, 0\.5\)"):
        robust.trim_count(10, 0.5)
    with pytest.raises(InvalidInputError, match="Byzantine fraction"):
        robust.byzantine_count(10, -0.1)


@pytest.mark.parametrize(("m", "f"), [(2, 0), (5, 1), (7, 2), (9, 3)])
def test_krum_scores_match_the_slow_reference(m: int, f: int) -> None:
    x = np.random.default_rng(m + f).standard_normal((m, 7))
    got = robust.krum_scores(x, f)
    assert np.allclose(got, ref_krum_scores(x.tolist(), f), rtol=1e-12)
    keep = robust.krum_select(x, f, 1)
    assert keep.tolist() == [int(np.argmin(got))]
    k = max(1, m - f)
    assert sorted(robust.krum_select(x, f, k).tolist()) == sorted(np.argsort(got)[:k].tolist())


def test_krum_rejects_an_outlier_and_handles_huge_values() -> None:
    x = np.random.default_rng(0).standard_normal((7, 50)) * 0.01
    x[3] = 1e30  # far from everyone, and its squares overflow float32 (not float64)
    assert 3 not in robust.krum_select(x, 2, 5).tolist()
    assert robust.krum_scores(x, 2)[3] > 1e59


def test_outliers_are_exactly_the_updates_beyond_the_bound() -> None:
    norms = np.array([[1.0, 0.0], [1.2, 0.0], [0.9, 0.0], [5.1, 0.0], [5.0, 2.0]])
    # medians 1.2 and 0; factor 4 -> bound 4.8 and 0
    got = robust.outliers(norms, 4.0)
    assert got.tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
    assert not robust.outliers(norms, 0.0).any()
    with pytest.raises(InvalidInputError, match=r"factor 0\.5 must be 0 \(off\) or >= 1"):
        robust.outliers(norms, 0.5)


def test_update_norms_use_the_reference_except_for_deltas() -> None:
    c = client(1)
    norms = robust.tensor_update_norms(c, GLOBAL, ["w", "b"])
    assert norms[0] == pytest.approx(np.linalg.norm(c["w"].astype(np.float64) - GLOBAL["w"]))
    d = robust.tensor_update_norms(c, GLOBAL, ["w", "b"], deltas={"w"})
    assert d[0] == pytest.approx(np.linalg.norm(c["w"].astype(np.float64)))
    assert d[1] == norms[1]


# --------------------------------------------------------------------------- aggregate_payloads


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum", "multi-krum"])
def test_robust_rules_in_aggregate_payloads_match_numpy(rule: str) -> None:
    states = [client(s) for s in range(7)]
    res = aggregate_payloads(payloads(states), rule, trim_fraction=0.3, byzantine=2)
    for name in ("w", "b"):
        stack = np.stack([s[name].astype(np.float64) for s in states])
        if rule == "median":
            want = coordinatewise(stack, ref_median)
        elif rule == "trimmed-mean":
            want = coordinatewise(stack, lambda v: ref_trimmed(v, 2))
        else:
            flat = [np.concatenate([s["w"].ravel(), s["b"].ravel(), [s["n"]]]) for s in states]
            scores = ref_krum_scores([list(map(float, r)) for r in flat], 2)
            keep = np.argsort(scores, kind="stable")[: 1 if rule == "krum" else 5]
            want = stack[keep].mean(axis=0)
        assert res.tensors[name].dtype == np.float32
        assert np.allclose(res.tensors[name], want, atol=1e-6)
    # integer tensors: the rule's value, rounded
    n = np.array([float(s["n"]) for s in states])
    if rule == "median":
        assert int(res.tensors["n"]) == int(np.rint(np.median(n)))
    assert res.tensors["n"].dtype == np.int64


def test_norm_bound_leaves_out_exactly_the_outliers() -> None:
    honest = [client(s) for s in range(6)]
    bad = {k: (v * np.float32(1e6) if v.dtype.kind == "f" else v) for k, v in client(9).items()}
    pl = payloads([*honest, bad])
    for rule in ("mean", "inverse-mse"):
        res = aggregate_payloads(pl, rule, reference=GLOBAL)
        assert res.dropped == (6,)
        clean = aggregate_payloads(payloads(honest), rule, reference=GLOBAL)
        for name in ("w", "b"):
            assert res.weights[name][6] == 0.0
            assert np.allclose(res.tensors[name], clean.tensors[name], rtol=1e-6, atol=1e-7)
        assert np.all(np.abs(res.tensors["w"]) < 10)
        off = aggregate_payloads(pl, rule, reference=GLOBAL, norm_bound=0)
        assert off.dropped == () and np.abs(off.tensors["w"]).max() > 1e4
    # the robust rules see the global model's value (a zero update) instead
    res = aggregate_payloads(pl, "median", reference=GLOBAL)
    assert res.dropped == (6,)
    stack = np.stack([*(s["w"] for s in honest), GLOBAL["w"]]).astype(np.float64)
    assert np.allclose(res.tensors["w"], np.median(stack, axis=0), atol=1e-7)


def test_norm_bound_changes_nothing_without_outliers() -> None:
    pl = payloads([client(s) for s in range(6)], QuantSpec(default_bits=4))
    for rule in ("inverse-mse", "mean", "median"):
        a = aggregate_payloads(pl, rule, reference=GLOBAL)
        b = aggregate_payloads(pl, rule, norm_bound=0)
        assert a.dropped == ()
        for name in a.tensors:
            assert np.array_equal(a.tensors[name], b.tensors[name])  # bit for bit


def test_norm_bound_on_delta_payloads_measures_the_deltas() -> None:
    spec = QuantSpec(default_bits=4)
    pl = []
    for s in range(6):
        local = client(s) if s < 5 else {**client(s), "w": GLOBAL["w"] + 100.0}
        pl.append(encode_delta(local, GLOBAL, spec, seed=s).result.payload)
    res = aggregate_payloads(pl, "mean", reference=GLOBAL)
    assert res.dropped == (5,)
    assert np.abs(res.tensors["w"]).max() < 1  # the aggregated delta, without the outlier


def test_bad_robust_options_are_one_clear_error() -> None:
    pl = payloads([client(s) for s in range(4)])
    with pytest.raises(InvalidInputError, match=r"norm_bound=0\.5 must be 0 \(off\) or >= 1"):
        aggregate_payloads(pl, "mean", reference=GLOBAL, norm_bound=0.5)
    with pytest.raises(InvalidInputError, match="reference model has nothing for 'w'"):
        aggregate_payloads(pl, "mean", reference={"b": GLOBAL["b"]})
    with pytest.raises(InvalidInputError, match=r"reference model has \(2,\) for 'b'"):
        aggregate_payloads(pl, "mean", reference={**GLOBAL, "b": np.zeros(2, np.float32)})
    with pytest.raises(InvalidInputError, match="trim fraction"):
        aggregate_payloads(pl, "trimmed-mean", trim_fraction=0.5)
    with pytest.raises(InvalidInputError, match="byzantine=-1 must be >= 0"):
        aggregate_payloads(pl, "krum", byzantine=-1)
    with pytest.raises(InvalidInputError, match="'median' picks clients by their tensors"):
        compute_weights("median", ["w"], num_clients=3)
    mixed = [*pl[:2], encode_delta(client(5), GLOBAL, RAW, seed=0).result.payload]
    with pytest.raises(InvalidInputError, match=r"payloads mix uploads \['delta', 'weights'\]"):
        aggregate_payloads(mixed, "mean", reference=GLOBAL)


# --------------------------------------------------------------------------- attacks


def test_alie_z_follows_baruch_et_al() -> None:
    assert adversary.alie_z(10, 3) == pytest.approx(NormalDist().inv_cdf(0.7))  # s = 3
    assert adversary.alie_z(10, 1) == 0.0  # s = 5: the mean itself
    assert adversary.alie_z(50, 12) == pytest.approx(NormalDist().inv_cdf((50 - 14) / 50))
    assert adversary.alie_z(4, 4) == pytest.approx(NormalDist().inv_cdf(0.75))  # s raised to 1
    with pytest.raises(ConfigError, match="alie: 5 attackers of 4 clients"):
        adversary.alie_z(4, 5)


def test_each_attack_sends_what_it_should() -> None:
    mine = client(1)
    start = GLOBAL
    for mode, s in (("scale-1e3", 1e3), ("scale-1e6", 1e6)):
        out = adversary.attack(mode, mine, start)
        assert np.allclose(out["w"], s * mine["w"].astype(np.float64), rtol=1e-6)
        assert out["n"] is mine["n"] or np.array_equal(out["n"], mine["n"])  # integers as trained
    flip = adversary.attack("sign-flip", mine, start)
    assert np.allclose(flip["w"] - start["w"], -(mine["w"] - start["w"]), atol=1e-6)
    flip_d = adversary.attack("sign-flip", mine, start, deltas={"w"})
    assert np.allclose(flip_d["w"], -mine["w"])
    g1 = adversary.attack("gaussian", mine, start, rng=np.random.default_rng(5))
    g2 = adversary.attack("gaussian", mine, start, rng=np.random.default_rng(5))
    assert np.array_equal(g1["w"], g2["w"])  # seeded
    big = {"w": np.zeros((400, 50), np.float32) + 2.0}
    noise = adversary.attack(
        "gaussian", big, {"w": np.zeros((400, 50), np.float32)}, rng=np.random.default_rng(0)
    )
    assert np.std(noise["w"]) == pytest.approx(2.0, rel=0.02)  # rms of the trained tensor
    honest = [client(s) for s in range(2, 9)]
    z = adversary.alie_z(8, 1)
    alie = adversary.attack("alie", mine, start, honest=honest, z=0.8)
    u = np.stack([h["w"].astype(np.float64) - start["w"] for h in honest])
    want = start["w"] + u.mean(axis=0) - 0.8 * u.std(axis=0)
    assert np.allclose(alie["w"], want, atol=1e-6)
    assert z == 0.0
    with pytest.raises(ConfigError, match="alie needs the round's honest updates"):
        adversary.attack("alie", mine, start)
    with pytest.raises(ConfigError, match="'nope' is unknown"):
        adversary.attack("nope", mine, start)


TINY = dict(num_clients=10, rounds=2, seed=3, batch_size=16, threads=1)


@pytest.fixture(scope="module")
def tiny_data():  # type: ignore[no-untyped-def]
    from fedquant.fl.data import Dataset, load_dataset

    full = load_dataset("mnist-embedded", None, None)
    return Dataset(
        full.name,
        full.train_x[:400],
        full.train_y[:400],
        full.test_x[:200],
        full.test_y[:200],
        full.classes,
    )


@pytest.mark.parametrize("mode", [*adversary.ATTACKS, "zero-mse"])
def test_defaults_keep_the_model_finite_under_attack(mode: str, tiny_data) -> None:  # type: ignore[no-untyped-def]
    cfg = RunConfig(**TINY, hostile_fraction=0.3, hostile_mode=mode)
    sim = Simulation(cfg, dataset=tiny_data)
    state = sim.run()
    for v in state.global_state.values():
        assert np.isfinite(v).all()
    assert np.abs(state.global_state["fc1.weight"]).max() < 10
    last = state.metrics[-1]
    assert math.isfinite(last["test_loss"])
    if mode.startswith("scale") or mode == "gaussian":
        assert last["norm_outliers"] == 3  # every attacker left out of some tensor
    if mode == "zero-mse":  # admitted: its claim is floored and its weight capped
        assert last.get("clients_rejected", 0) == 0
        assert last["clients_aggregated"] == TINY["num_clients"]
    if mode == "alie":  # within the honest spread: never an outlier
        assert "norm_outliers" not in last
    if mode in ("gaussian", "alie"):
        again = Simulation(cfg, dataset=tiny_data).run()
        for k, v in state.global_state.items():
            assert np.array_equal(v, again.global_state[k])  # seeded


def test_scaled_model_wrecks_the_model_without_the_bound(tiny_data) -> None:  # type: ignore[no-untyped-def]
    cfg = RunConfig(**TINY, hostile_fraction=0.3, hostile_mode="scale-1e6", norm_bound=0)
    state = Simulation(cfg, dataset=tiny_data).run()
    assert max(np.abs(v).max() for v in state.global_state.values()) > 1e4


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum", "multi-krum"])
def test_robust_rules_run_in_the_simulator(rule: str, tiny_data) -> None:  # type: ignore[no-untyped-def]
    cfg = RunConfig(
        **{**TINY, "rounds": 1}, aggregation=rule, hostile_fraction=0.3, hostile_mode="scale-1e6"
    )
    state = Simulation(cfg, dataset=tiny_data).run()
    assert all(np.isfinite(v).all() for v in state.global_state.values())
    assert state.metrics[-1]["clients_aggregated"] == 10


def test_attacks_decode_like_honest_payloads(tiny_data) -> None:  # type: ignore[no-untyped-def]
    cfg = RunConfig(**{**TINY, "rounds": 1}, hostile_fraction=0.1, hostile_mode="sign-flip")
    sim = Simulation(cfg, dataset=tiny_data)
    (attacker,) = sim.hostile
    cast = sim.broadcast_step(sim.new_state(), 1)
    start = cast.start
    sent = [sim.client_payload(c, start, 1) for c in range(10)]
    out = {r.client: r.payload for r in sim.replies(sent, cast)}
    mine = decode(sent[attacker].payload).tensors
    got = decode(out[attacker]).tensors
    for name in ("bn1.running_var", "fc2.bias"):  # travel unquantized: exactly the flipped update
        assert np.allclose(got[name] - start[name], -(mine[name] - start[name]), atol=1e-6)
    assert got["bn1.num_batches_tracked"] == mine["bn1.num_batches_tracked"]
    assert all(out[u.client] == u.payload for u in sent if u.client != attacker)


def test_config_rejects_bad_robust_values() -> None:
    with pytest.raises(ConfigError, match="norm_bound.*0 \\(no bound\\) or a number >= 1"):
        RunConfig(norm_bound=0.5)
    with pytest.raises(ConfigError, match="trim_fraction.*below 0.5"):
        RunConfig(trim_fraction=0.5)
    with pytest.raises(ConfigError, match="byzantine_fraction"):
        RunConfig(byzantine_fraction=-0.1)
    for rule, mode in itertools.product(("krum", "multi-krum"), adversary.ATTACKS):
        RunConfig(aggregation=rule, hostile_mode=mode)  # every combination is valid


def test_the_default_bound_leaves_honest_runs_unchanged(tiny_data) -> None:  # type: ignore[no-untyped-def]
    # IID; with tiny non-IID clients honest BatchNorm statistics can exceed the bound
    # (docs/robustness.md)
    cfg = RunConfig(**TINY)
    on = Simulation(cfg, dataset=tiny_data).run()
    off = Simulation(cfg.with_(norm_bound=0.0), dataset=tiny_data).run()
    assert all("norm_outliers" not in r for r in on.metrics)
    for k, v in on.global_state.items():
        assert np.array_equal(v, off.global_state[k])
