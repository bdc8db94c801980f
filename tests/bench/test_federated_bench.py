"""Smoke runs and behaviour of the federated benchmarks (tiny sizes; no timing thresholds)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedquant.errors import ConfigError, FedquantError
from fedquant.fl import simulation
from fedquant.fl.config import RunConfig
from fedquant.fl.data import Dataset, load_dataset
from fedquant.tools.bench import cli, federated, report

#: two clients of 100 images each, 100 test images: every run here takes seconds
BASE = RunConfig(num_clients=2)


@pytest.fixture(scope="module")
def tiny() -> Dataset:
    return federated.small_dataset(load_dataset("mnist-embedded"), 200, 100)


@pytest.fixture(scope="module")
def bytes_result(tiny: Dataset) -> dict[str, Any]:
    return federated.bytes_to_target(
        BASE, methods=["octav-stochastic-2"], rounds=2, seeds=(0,), dataset=tiny
    )


@pytest.fixture(scope="module")
def overhead_result(tiny: Dataset) -> dict[str, Any]:
    return federated.overhead(BASE.with_(rounds=2), dataset=tiny)


# --------------------------------------------------------------------------- target logic


def _metrics(accs: list[float | None], per_round: int = 1000) -> list[dict[str, Any]]:
    """Fixture metrics: one row per round, ``None`` = round not evaluated."""
    rows = []
    for i, a in enumerate(accs, start=1):
        row: dict[str, Any] = {"round": i, "cum_uplink_bytes": per_round * i}
        if a is not None:
            row["test_accuracy"] = a
        rows.append(row)
    return rows


def test_reference_is_the_mean_of_the_last_k_evaluated_rounds() -> None:
    m = _metrics([0.5, 0.8, None, 0.9, 0.7])
    assert federated.reference_accuracy(m, 3) == pytest.approx((0.8 + 0.9 + 0.7) / 3)
    assert federated.reference_accuracy(m, 1) == pytest.approx(0.7)
    assert federated.reference_accuracy(m, 10) == pytest.approx((0.5 + 0.8 + 0.9 + 0.7) / 4)
    with pytest.raises(FedquantError, match="evaluated no round"):
        federated.reference_accuracy(_metrics([None, None]))
    with pytest.raises(ConfigError, match="not a positive integer"):
        federated.reference_accuracy(m, 0)


def test_target_is_the_reference_minus_the_margin() -> None:
    assert federated.target_accuracy(_metrics([0.5, 0.7, 0.8]), k=2, margin=0.01) == pytest.approx(
        0.75 - 0.01
    )
    assert federated.target_accuracy(_metrics([0.9])) == pytest.approx(0.89)  # default: 1 point
    with pytest.raises(FedquantError, match="evaluated no round"):
        federated.target_accuracy([])


def test_first_reaching_returns_the_first_round_at_or_above_the_target() -> None:
    m = _metrics([0.5, None, 0.85, 0.8, 0.95], per_round=250)
    assert federated.first_reaching(m, 0.85) == {
        "round": 3,
        "test_accuracy": 0.85,
        "cum_uplink_bytes": 750,
    }
    assert federated.first_reaching(m, 0.96) is None
    assert federated.first_reaching(_metrics([math.nan, 0.9]), 0.5)["round"] == 2  # type: ignore[index]


def test_first_reaching_an_exact_target_despite_float_round_off() -> None:
    # a float32 reference whose last 3 rounds average 0.954, minus 1 point, is not 0.944 exactly
    target = federated.target_accuracy(_metrics([0.953, 0.954, 0.955]), k=3, margin=0.01)
    assert target != 0.944 and math.isclose(target, 0.944)
    m = _metrics([0.93, 0.944, 0.95])
    assert federated.first_reaching(m, target)["round"] == 2  # type: ignore[index]
    # one test image below (1/1000) is still not reached
    assert federated.first_reaching(_metrics([0.943]), target) is None


def test_resolve_methods_puts_fp32_first_and_probes_the_options() -> None:
    chosen, skipped = federated.resolve_methods(["octav-nearest-2", "fp32"])
    assert [m.name for m in chosen] == ["fp32", "octav-nearest-2"]
    assert skipped == []
    chosen, _ = federated.resolve_methods(["octav-nearest-2"])
    assert chosen[0] is federated.FP32
    with pytest.raises(ConfigError, match="unknown method"):
        federated.resolve_methods(["octav-17"])
    everything, skipped = federated.resolve_methods()
    names = {m.name for m in everything}
    assert {m.name for m in federated.CORE_METHODS} <= names
    for m in federated.OPTIONAL_METHODS:  # each option either runs or says why not
        try:
            m.config(RunConfig())
            accepted = True
        except (FedquantError, TypeError, ValueError):
            accepted = False
        assert (m.name in names) is accepted
        assert any(s.startswith(m.name + ":") for s in skipped) is not accepted
    core, _ = federated.resolve_methods(include_optional=False)
    assert [m.name for m in core] == [m.name for m in federated.CORE_METHODS]


# --------------------------------------------------------------------------- bytes to target


def test_bytes_to_target_smoke(bytes_result: dict[str, Any]) -> None:
    r = bytes_result
    assert [m["method"] for m in r["methods"]] == ["fp32", "octav-stochastic-2"]
    assert r["target"] == pytest.approx(r["reference"] - 0.01)
    fp32 = next(x for x in r["runs"] if x["method"] == "fp32")
    # 2 rounds < k = 3: the reference is the mean of both rounds (paired by seed)
    assert r["targets"]["0"] == pytest.approx(np.mean(fp32["accuracy"]) - 0.01)
    for run in r["runs"]:
        assert len(run["accuracy"]) == 2
        assert run["target"] == r["targets"][str(run["seed"])]
        # fixed bits: every round sends the same bytes, so bytes to target = round x per round
        if run["bytes_to_target"] is not None:
            assert run["bytes_to_target"] == run["round_to_target"] * run["uplink_bytes_per_round"]
            assert run["accuracy"][run["round_to_target"] - 1] >= run["target"]
            assert all(a < run["target"] for a in run["accuracy"][: run["round_to_target"] - 1])
        else:
            assert max(run["accuracy"]) < run["target"]
    two_bit = r["methods"][1]
    assert two_bit["per_round_vs_fp32"] < 0.1  # 2-bit codes vs float32: ~16x fewer bytes
    if two_bit["bytes_to_target"] is not None and r["methods"][0]["bytes_to_target"]:
        assert two_bit["fewer_bytes_than_fp32"] == pytest.approx(
            r["methods"][0]["bytes_to_target"] / two_bit["bytes_to_target"]
        )


def test_reported_bytes_equal_the_payload_lengths(tiny: Dataset) -> None:
    cfg = BASE.with_(rounds=1, bits="4-2-2-4")
    rows = federated.run_metrics(cfg, tiny)
    # replay round 1's clients (every stream derives from (seed, round, client))
    sim = simulation.Simulation(cfg, dataset=tiny)
    state = sim.new_state()
    lengths = [len(sim.client_payload(c, state.global_state, 1).payload) for c in range(2)]
    assert rows[0]["uplink_bytes"] == rows[0]["cum_uplink_bytes"] == sum(lengths)


def test_bytes_to_target_rejects_bad_arguments(tiny: Dataset) -> None:
    with pytest.raises(ConfigError, match="rounds"):
        federated.bytes_to_target(BASE, rounds=0, dataset=tiny)
    with pytest.raises(ConfigError, match="seed"):
        federated.bytes_to_target(BASE, seeds=(), dataset=tiny)
    with pytest.raises(ConfigError, match="workers"):
        federated.bytes_to_target(BASE, workers=0, dataset=tiny)


# --------------------------------------------------------------------------- overhead


def test_overhead_splits_every_round(overhead_result: dict[str, Any]) -> None:
    ov = overhead_result
    assert [r["round"] for r in ov["rounds"]] == [1, 2]
    for r in ov["rounds"]:
        parts = [r[c] for c in federated.CATEGORIES]
        assert all(p >= 0 for p in parts)
        assert r["train"] > 0 and r["encode"] > 0 and r["aggregate"] > 0 and r["evaluate"] > 0
        assert r["results"] > 0  # the checkpoint and metrics files `fedquant run` writes
        assert sum(parts) + r["other"] == pytest.approx(r["seconds_round"])
        assert r["non_training"] == pytest.approx(r["seconds_round"] - r["train"] - r["evaluate"])
        assert r["samples"] == 200  # both clients, all their images
        assert r["rss_bytes"] > 0
    st = ov["steady"]
    assert st["rounds"] == 1  # round 1 is the warm-up
    assert 0 < st["share_non_training"] < 1
    assert st["samples_per_s"] == pytest.approx(st["samples"] / st["train"])
    mem = ov["memory"]
    assert mem["model_float32_bytes"] == 330_136  # the paper's CNN (README)
    assert mem["peak_rss"] >= max(r["rss_bytes"] for r in ov["rounds"])


@pytest.mark.slow  # a fresh interpreter imports torch and numba
def test_memory_over_rounds_reads_the_floor() -> None:
    row = federated.memory_over_rounds(
        16, num_clients=2, n_train=100, n_test=50, window=4, warmup=2
    )
    rss = row["rss_rounds"]
    assert len(rss) == 16 and row["results"] is True
    assert row["floor_first"] == min(rss[2:6]) and row["floor_last"] == min(rss[-4:])
    assert row["floor_growth"] == row["floor_last"] - row["floor_first"]
    assert row["floor_growth_per_round"] == pytest.approx(row["floor_growth"] / (14 - 4))
    assert row["flat"] == (row["floor_growth_per_round"] < row["model_float32_bytes"] / 20)
    assert row["peak_rss"] >= max(rss)  # the child's own peak (VmHWM), not the parent's
    with pytest.raises(ConfigError, match="too few"):
        federated.memory_over_rounds(5, window=4, warmup=2)
    # a probe whose process fails is an error carrying its stderr
    with pytest.raises(
        FedquantError, match="(?s)failed in its process.*num_clients: 0 is out of range"
    ):
        federated._probe_in_fresh_process({"num_clients": 0, "rounds": 1}, 300)


@pytest.mark.slow  # a fresh interpreter imports torch and numba
def test_overhead_in_a_fresh_process(tmp_path: Path) -> None:
    lines: list[str] = []
    ov = federated.overhead_in_fresh_process(
        BASE.with_(rounds=2), n_train=200, n_test=100, log=lines.append
    )
    assert ov["fresh_process"] is True
    assert [r["round"] for r in ov["rounds"]] == [1, 2]
    assert all(r["results"] > 0 and r["samples"] == 200 for r in ov["rounds"])
    assert ov["train_examples"] == 200 and ov["test_examples"] == 100
    assert len(lines) == 2 and lines[0].startswith("  round 1:")
    assert "| fresh process | yes |" in "\n".join(report._overhead_md(ov))
    # a run the child cannot start is an error naming the cause, not a hang or a crash
    missing = BASE.with_(dataset="mnist", data_root=str(tmp_path / "nowhere"), rounds=1)
    with pytest.raises(FedquantError, match="measuring process failed"):
        federated.overhead_in_fresh_process(missing)


def test_timed_simulation_restores_the_simulator(tiny: Dataset) -> None:
    sim = simulation.Simulation(BASE.with_(rounds=1), dataset=tiny)
    originals = {n: getattr(simulation, n) for n in federated.TIMED if hasattr(simulation, n)}
    with pytest.raises(RuntimeError, match="boom"), federated.timed_simulation(sim) as acc:
        assert simulation.train_local is not originals["train_local"]
        sim.broadcast(sim.new_state(), 1)
        assert acc["broadcast"][1] == 1
        raise RuntimeError("boom")
    assert {n: getattr(simulation, n) for n in originals} == originals
    assert "broadcast" not in vars(sim)


def test_profile_rounds_lists_functions(tiny: Dataset) -> None:
    rows = federated.profile_rounds(BASE, rounds=1, top=5, dataset=tiny)
    assert len(rows) == 5
    assert all(0 <= r["share"] <= 1 and r["calls"] >= 1 for r in rows)
    assert [r["tottime"] for r in rows] == sorted((r["tottime"] for r in rows), reverse=True)


def test_memory_probe() -> None:
    here = federated.memory_probe(2, 1, n_train=200, n_test=100)
    assert here["rss_setup"] > 0 and len(here["rss_rounds"]) == 1
    assert here["peak_rss"] >= here["rss_end"]


@pytest.mark.slow  # a fresh interpreter imports torch and numba
def test_memory_vs_clients_in_a_fresh_process() -> None:
    (row,) = federated.memory_vs_clients((2,), rounds=1, n_train=200, n_test=100)
    assert row["num_clients"] == 2 and row["train_examples"] == 200
    assert row["extra_vs_first"] == 0 and row["model_copies_would_add"] == 0


# --------------------------------------------------------------------------- Flower


def _flower_sim() -> Any:
    return pytest.importorskip("fedquant.tools.bench.flower_ray", reason="needs fedquant[flower]")


def test_flower_comparison_is_skipped_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    flower_sim = _flower_sim()
    monkeypatch.setattr(flower_sim, "flower_missing", lambda: "ray is missing")
    out = flower_sim.simulator_vs_flower(BASE, rounds=1)
    assert out["skipped"] == "ray is missing" and out["rows"] == []
    assert "Skipped: ray is missing" in "\n".join(report.federated_markdown({"flower": out}))


def test_flower_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    assert federated.flower_missing() == "ray is not installed (pip install 'fedquant[flower-sim]')"


def test_flower_comparison_refuses_what_it_cannot_compare() -> None:
    flower_sim = _flower_sim()
    with pytest.raises(ConfigError, match="client_fraction"):
        flower_sim.simulator_vs_flower(BASE.with_(client_fraction=0.5))
    with pytest.raises(ConfigError, match="client_cpus"):
        flower_sim.simulator_vs_flower(BASE, client_cpus=(0,))


@pytest.mark.slow
def test_simulator_vs_flower_smoke() -> None:
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    flower_sim = _flower_sim()
    out = flower_sim.simulator_vs_flower(BASE, rounds=1, client_cpus=(2,), n_train=200, n_test=100)
    sim_row, fl_row = out["rows"]
    assert "error" not in fl_row, fl_row.get("error")
    assert sim_row["runtime"] == "fedquant simulator"
    assert fl_row["startup_s"] > 0 and len(fl_row["round_s"]) == 1
    # same clients, data, seeds and codec: the same global model (both train on 2 threads;
    # 1e-5 allows for a different thread count in the Ray actor)
    assert fl_row["max_model_difference"] < 1e-5
    assert fl_row["max_accuracy_difference"] <= 0.01  # at most one of 100 test images
    assert fl_row["total_vs_simulator"] == pytest.approx(fl_row["total_s"] / sim_row["total_s"])


# --------------------------------------------------------------------------- report and command


def test_markdown_renders_the_measured_section(
    bytes_result: dict[str, Any], overhead_result: dict[str, Any]
) -> None:
    fed = {"command": "python -m fedquant.tools.bench --only federated", "quick": True}
    fed |= {"bytes_to_target": bytes_result, "overhead": overhead_result}
    text = "\n".join(report.federated_markdown(fed))
    for heading in (
        "## Federated",
        "### Uplink bytes to the target accuracy",
        "### The simulator's overhead and memory",
        "`octav-stochastic-2`",
        "**overhead**",
    ):
        assert heading in text
    assert "Not in this run" in "\n".join(report.federated_markdown(None))


def test_command_writes_the_federated_section(tmp_path: Path) -> None:
    argv = ["--only", "federated", "--quick", "--out", str(tmp_path), "--fed-parts", "bytes"]
    argv += ["--fed-rounds", "1", "--fed-methods", "fp32"]
    assert cli.main(argv) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    fed = res["sections"]["federated"]
    assert fed["parts"] == ["bytes"] and fed["quick"] is True
    assert [m["method"] for m in fed["bytes_to_target"]["methods"]] == ["fp32"]
    assert "### Uplink bytes to the target accuracy" in (tmp_path / "bench.md").read_text()


def test_merge_federated_keeps_every_part_and_command() -> None:
    a = {"created": "a", "sections": {"federated": {"command": "A", "bytes_to_target": {"x": 1}}}}
    b = {"created": "b", "sections": {"federated": {"command": "B", "overhead": {"y": 2}}}}
    merged = report.merge_federated([a, b])
    fed = merged["sections"]["federated"]
    assert fed["bytes_to_target"] == {"x": 1} and fed["overhead"] == {"y": 2}
    assert fed["commands"] == ["A", "B"] and [r["created"] for r in fed["runs"]] == ["a", "b"]
    with pytest.raises(ValueError, match="no results"):
        report.merge_federated([])
