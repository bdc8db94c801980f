"""The benchmark command: ``fedquant bench`` (also ``python -m fedquant.tools.bench``).

Runs the sections asked for, then writes ``<out>/bench.json`` (every row) and
``<out>/bench.md`` (the tables, generated from the JSON) and prints the
Markdown's headline. Sections:

``grid``
    :func:`fedquant.tools.bench.grid.grid_table` -- OCTAV's coefficient vs the grid.
``error``
    :mod:`fedquant.tools.bench.error` -- NMSE of fedquant, the peers and the limits on
    synthetic sources and on the paper's CNN trained centrally on MNIST and
    CIFAR-10 (or on checkpoints given with ``--weights``).
``speed``
    :mod:`fedquant.tools.bench.speed` -- throughput as a ratio to memcpy, 1 thread and
    all threads; with ``--device cuda`` also a torch implementation on the GPU.
``federated`` (not in the default set: it trains for tens of minutes)
    :mod:`fedquant.tools.bench.federated` -- uplink bytes to a target accuracy per
    method, the default run's overhead and memory, and the simulator vs
    Flower's simulation engine (:mod:`fedquant.tools.bench.flower_ray`, skipped
    without Ray). ``--fed-parts`` picks some of them.
``beyond``
    The "beyond the paper" options of :class:`~fedquant.quant.spec.QuantSpec`:
    the randomized Hadamard rotation (``rotation=True``,
    :mod:`fedquant.tools.bench.rotation`), rANS coding of the codes
    (``entropy="rans"``, :mod:`fedquant.tools.bench.entropy`) and adaptive per-layer
    bit allocation (``bits="auto:B"``, :func:`fedquant.tools.bench.allocation.codec_comparison`)
    -- on the synthetic sources and on the same model weights as ``error``
    (loaded once when both run), plus the speed of rotation and rANS.

``--quick`` runs every section at tiny sizes (a smoke test, ~30 s; its
figures mean nothing). The full run takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.argparsing import Parser
from fedquant.errors import ConfigError, FedquantError

SECTIONS = ("grid", "error", "speed", "federated", "beyond", "averaging")
DEFAULT_SECTIONS = ("grid", "error", "speed", "beyond")
FED_PARTS = ("bytes", "overhead", "flower")
MODELS = ("mnist", "cifar10")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="fedquant benchmarks: quantization error vs peers and limits, speed "
        "as a ratio to memcpy, and the options beyond the paper (rotation, rANS coding, "
        "adaptive bit allocation). Writes OUT/bench.json and OUT/bench.md.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (~30 s)")
    p.add_argument("--out", default="bench-results", help="output folder (default: %(default)s)")
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated sections of {', '.join(SECTIONS)} (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="the 'all threads' count of the speed table (default and maximum: the threads "
        "numba started with, NUMBA_NUM_THREADS)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="also time a torch implementation on this device, e.g. cuda (default: cpu only)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every sample and draw")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7, quick 3)")
    p.add_argument("--n-speed", type=int, default=None, help="speed tensor size (default 10M)")
    p.add_argument("--n-error", type=int, default=None, help="synthetic samples (default 2^20)")
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help="models trained for the real-weights table, of mnist,cifar10 (default: %(default)s)",
    )
    p.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="benchmark this checkpoint (.npz/.pt state dict) as model NAME instead of training",
    )
    p.add_argument(
        "--cifar-root",
        default=os.environ.get("FEDQUANT_CIFAR_ROOT"),
        help="CIFAR-10 JPEG folder or .tar.gz (default: $FEDQUANT_CIFAR_ROOT; skipped if unset)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where trained benchmark models are cached (default: fedquant's cache dir /bench)",
    )
    p.add_argument(
        "--markdown", default=None, help="write the Markdown report here (default: OUT/bench.md)"
    )
    fed = p.add_argument_group("federated section")
    fed.add_argument(
        "--fed-parts",
        default=",".join(FED_PARTS),
        help=f"parts of the federated section, of {','.join(FED_PARTS)} (default: %(default)s)",
    )
    fed.add_argument("--fed-rounds", type=int, default=None, help="rounds per run (default 20)")
    fed.add_argument("--fed-seeds", default=None, help="seeds per method (default 0,1)")
    fed.add_argument(
        "--fed-methods",
        default=None,
        help="methods of fedquant.tools.bench.federated.ALL_METHODS (default: all RunConfig accepts)",
    )
    fed.add_argument(
        "--fed-workers", type=int, default=1, help="runs in parallel processes (default 1)"
    )
    fed.add_argument(
        "--overhead-rounds", type=int, default=None, help="rounds of the overhead run (default 30)"
    )
    fed.add_argument(
        "--flower-rounds",
        type=int,
        default=None,
        help="rounds of the Flower comparison (default 5)",
    )
    fed.add_argument(
        "--flower-cpus",
        default=None,
        help="CPUs per Flower client (Ray actor), one comparison each (default 2,1)",
    )
    return p


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise ConfigError(
            "--only",
            f"{text!r} names unknown section(s) {bad}; expected some of {', '.join(SECTIONS)}",
        )
    return names


def _weights_args(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError("--weights", f"{item!r} is not NAME=PATH, e.g. mnist=model.npz")
        out[name] = path
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the sections of parsed ``args``; returns the results dictionary."""
    from fedquant.tools.bench import error, grid, speed

    sections = _sections(args.only)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ConfigError(
            "--models", f"unknown model(s) {bad}; expected some of {', '.join(MODELS)}"
        )
    weights = _weights_args(args.weights)
    if args.threads < 0:
        raise ConfigError("--threads", f"{args.threads} is negative; expected 0 (all) or more")
    for option, value in (
        ("--reps", args.reps),
        ("--n-speed", args.n_speed),
        ("--n-error", args.n_error),
    ):
        if value is not None and value < 1:
            raise ConfigError(option, f"{value} is not a positive integer")
    quick = bool(args.quick)
    reps = args.reps if args.reps is not None else (3 if quick else 7)
    n_speed = args.n_speed or (1 << 16 if quick else 10_000_000)
    n_error = args.n_error or (1 << 12 if quick else 1 << 20)
    bits = (1, 2, 4) if quick else error.BITS
    device = str(args.device)
    if device != "cpu":
        import torch

        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ConfigError("--device", f"{device!r} is not a torch device: {e}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device", f"{device!r}: torch sees no CUDA device on this machine")

    results: dict[str, Any] = {
        "schema": 1,
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "seed": args.seed,
        "environment": speed.environment(),
        "peers": list(error.PEER_NAMES),
        "sections": {"federated": None},
    }
    sec = results["sections"]
    if "grid" in sections:
        t0 = time.perf_counter()
        sec["grid"] = {"n": n_error, "rows": grid.grid_table(bits, n=n_error, seed=args.seed)}
        _log(f"grid: {time.perf_counter() - t0:.1f} s")
    states: _States | None = None
    if {"error", "beyond", "averaging"} & set(sections):
        # the model weights these sections share, loaded (or trained) once
        t0 = time.perf_counter()
        states = _model_states(args, quick, models, weights)
        _log(f"model weights: {time.perf_counter() - t0:.1f} s")
    if "error" in sections:
        assert states is not None
        t0 = time.perf_counter()
        sec["error"] = _error_section(args, bits, n_error, states)
        _log(f"error: {time.perf_counter() - t0:.1f} s")
    if "speed" in sections:
        t0 = time.perf_counter()
        load_before = _load()
        all_threads = min(args.threads or speed.max_threads(), speed.max_threads())
        fq = speed.fedquant_speed(
            n=n_speed,
            bits=(2, 8) if quick else speed.SPEED_BITS,
            threads=sorted({1, all_threads}),
            reps=reps,
            seed=args.seed,
        )
        peer_widths = (
            {p: ws[:1] for p, ws in speed.SPEED_PEERS.items()} if quick else speed.SPEED_PEERS
        )
        pr = speed.peer_speed(
            n=n_speed, names=peer_widths, reps=max(1, reps // 2), seed=args.seed, threads=1
        )
        on_device = (
            speed.torch_speed(device, n=n_speed, reps=reps, seed=args.seed)
            if device != "cpu"
            else None
        )
        gbps = [r["memcpy_gbps"] for r in fq + pr if r.get("memcpy_gbps")]
        sec["speed"] = {
            "n": n_speed,
            "reps": reps,
            "memcpy_gbps_median": float(np.median(gbps)) if gbps else None,
            "fedquant": fq,
            "peers": pr,
            "device": on_device,
            "load_before": load_before,
            "load_after": _load(),
        }
        _log(f"speed: {time.perf_counter() - t0:.1f} s")
    if "beyond" in sections:
        assert states is not None
        t0 = time.perf_counter()
        all_threads = min(args.threads or speed.max_threads(), speed.max_threads())
        sec["beyond"] = _beyond_section(
            args,
            quick,
            n_error,
            n_speed,
            reps,
            sorted({1, all_threads}),
            states,
        )
        _log(f"beyond: {time.perf_counter() - t0:.1f} s")
    if "averaging" in sections:
        assert states is not None
        t0 = time.perf_counter()
        sec["averaging"] = _averaging_section(args, quick, n_error, states)
        _log(f"averaging: {time.perf_counter() - t0:.1f} s")
    if "federated" in sections:
        t0 = time.perf_counter()
        sec["federated"] = _federated_section(args, quick, command)
        _log(f"federated: {time.perf_counter() - t0:.1f} s")
    return results


def _int_list(option: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(option, f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 0:
        raise ConfigError(option, f"{text!r}: expected integers >= 0, e.g. 0,1")
    return values


def _federated_section(args: argparse.Namespace, quick: bool, command: str) -> dict[str, Any]:
    """The federated section (:mod:`fedquant.tools.bench.federated`); quick = tiny smoke sizes."""
    from fedquant.fl.config import RunConfig
    from fedquant.fl.data import load_dataset
    from fedquant.tools.bench import federated

    parts = tuple(s.strip() for s in args.fed_parts.split(",") if s.strip())
    bad = [s for s in parts if s not in FED_PARTS]
    if bad or not parts:
        raise ConfigError(
            "--fed-parts", f"{args.fed_parts!r}: expected some of {', '.join(FED_PARTS)}"
        )
    for option, value in (
        ("--fed-rounds", args.fed_rounds),
        ("--fed-workers", args.fed_workers),
        ("--overhead-rounds", args.overhead_rounds),
        ("--flower-rounds", args.flower_rounds),
    ):
        if value is not None and value < 1:
            raise ConfigError(option, f"{value} is not a positive integer")
    seeds = _int_list("--fed-seeds", args.fed_seeds or ("0" if quick else "0,1"))
    cpus = _int_list("--flower-cpus", args.flower_cpus or ("2" if quick else "2,1"))
    methods = (
        [m.strip() for m in args.fed_methods.split(",") if m.strip()]
        if args.fed_methods
        else (["fp32", "octav-stochastic-2"] if quick else None)
    )
    # quick: 2 clients on the first 400 / 200 examples; else the default run's data and clients
    base = RunConfig(num_clients=2) if quick else RunConfig()
    data = load_dataset(base.dataset, base.data_root, base.cache_dir)
    if quick:
        data = federated.small_dataset(data, 400, 200)
    out: dict[str, Any] = {"command": command, "parts": list(parts), "quick": quick}
    out["load_before"] = _load()
    if "bytes" in parts:
        t0 = time.perf_counter()
        out["bytes_to_target"] = federated.bytes_to_target(
            base,
            methods=methods,
            rounds=args.fed_rounds or (2 if quick else 20),
            seeds=seeds,
            dataset=data,
            workers=args.fed_workers,
            log=_log,
        )
        _log(f"federated bytes-to-target: {time.perf_counter() - t0:.1f} s")
    if "overhead" in parts:
        t0 = time.perf_counter()
        cfg = base.with_(rounds=args.overhead_rounds or (2 if quick else base.rounds))
        ov = federated.overhead_in_fresh_process(
            cfg, n_train=400 if quick else 0, n_test=200 if quick else 0, log=_log
        )
        ov["profile"] = federated.profile_rounds(
            cfg, rounds=1 if quick else 3, dataset=data, top=8 if quick else 20
        )
        ov["training_speed"] = federated.training_speed(
            (1, 2), reps=1 if quick else 3, dataset=data
        )
        ov["memory_over_rounds"] = federated.memory_over_rounds(
            30 if quick else 200, n_train=200 if quick else 1000, n_test=100 if quick else 200
        )
        ov["memory_vs_clients"] = federated.memory_vs_clients(
            (2, 4) if quick else (10, 100),
            rounds=1 if quick else 3,
            n_train=400 if quick else 0,
            n_test=200 if quick else 0,
        )
        out["overhead"] = ov
        _log(f"federated overhead: {time.perf_counter() - t0:.1f} s")
    if "flower" in parts:
        t0 = time.perf_counter()
        why = federated.flower_missing()
        if why is not None:
            out["flower"] = {"skipped": why, "rows": []}
        else:
            from fedquant.tools.bench.flower_ray import simulator_vs_flower

            out["flower"] = simulator_vs_flower(
                base,
                rounds=args.flower_rounds or (1 if quick else 5),
                client_cpus=cpus,
                n_train=400 if quick else 0,
                n_test=200 if quick else 0,
                log=_log,
            )
        _log(f"federated flower: {time.perf_counter() - t0:.1f} s")
    out["load_after"] = _load()
    return out


#: per model name: (state dict, training info or None, source or None); and the skipped notes
_States = tuple[
    dict[str, tuple[dict[str, np.ndarray], dict[str, Any] | None, str | None]], list[str]
]


def _model_states(
    args: argparse.Namespace,
    quick: bool,
    models: Sequence[str],
    weights: dict[str, str],
) -> _States:
    """The model weights of the ``error`` and ``beyond`` sections: the ``--weights``
    checkpoints, then each of ``models`` trained (cached), untrained in a quick run."""
    from fedquant.errors import DataError
    from fedquant.tools.bench.weights import load_state, trained_weights

    skipped: list[str] = []
    cache = Path(args.cache_dir) if args.cache_dir else _default_cache() / "bench"
    todo: dict[str, tuple[dict[str, np.ndarray], dict[str, Any] | None, str | None]] = {}
    for name, path in weights.items():
        todo[name] = (load_state(path), None, path)
    for m in models:
        if m in todo:
            continue
        if quick:
            todo[m] = (_untrained_state(m, args.seed), None, "untrained PaperCNN (quick run)")
            continue
        root = args.cifar_root if m == "cifar10" else None
        if m == "cifar10" and not root:
            skipped.append("cifar10: no --cifar-root (or $FEDQUANT_CIFAR_ROOT) given")
            continue
        try:
            t0 = time.perf_counter()
            state, trained = trained_weights(m, cache, root=root, seed=args.seed)
            _log(f"  {m}: weights ready in {time.perf_counter() - t0:.1f} s")
        except DataError as e:
            skipped.append(f"{m}: {e}")
            continue
        todo[m] = (state, asdict(trained), None)
    return todo, skipped


def _error_section(
    args: argparse.Namespace,
    bits: Sequence[int],
    n_error: int,
    states: _States,
) -> dict[str, Any]:
    from fedquant.tools.bench import error
    from fedquant.tools.bench.weights import quantizable_layers

    todo, skipped = states
    out: dict[str, Any] = {
        "n": n_error,
        "synthetic": error.synthetic_errors(n=n_error, bits=bits, seed=args.seed),
        "models": {},
        "skipped": list(skipped),
    }
    for name, (state, info, source) in todo.items():
        rows = error.weights_errors(state, name, bits=bits, seed=args.seed)
        out["models"][name] = {
            "train": info,
            "source": source,
            "layers": {k: int(v.size) for k, v in quantizable_layers(state).items()},
            "rows": rows,
            "total": error.aggregate_layers(rows, name),
        }
    return out


def _averaging_section(
    args: argparse.Namespace, quick: bool, n_error: int, states: _States
) -> dict[str, Any]:
    from fedquant.tools.bench import averaging
    from fedquant.tools.bench.sources import get_density
    from fedquant.tools.bench.weights import quantizable_layers

    todo, skipped = states
    width = 1024 if n_error >= 1 << 14 else 64
    gauss = get_density("gaussian").sample(n_error - n_error % width, seed=args.seed)
    sources = {"gaussian": {"x": gauss.reshape(-1, width)}}  # 2-D: quantized, not sent raw
    for name, (state, _info, _source) in todo.items():
        sources[name] = quantizable_layers(state)
    clients = (1, 4) if quick else averaging.CLIENTS
    bits = (2, 4) if quick else averaging.BITS
    sweep = [
        {
            "source": name,
            "bits": b,
            **averaging.threshold_sweep(
                tensors, rounding="stochastic", bits=b, clients=max(clients), seed=args.seed
            ),
        }
        for name, tensors in sources.items()
        for b in bits
    ]
    return {
        "n_gaussian": int(gauss.size),
        "clients": list(clients),
        "rows": averaging.averaging_table(sources, bits=bits, clients=clients, seed=args.seed),
        "sweep": sweep,
        "skipped": list(skipped),
    }


#: the fixed bit settings the allocation table compares ``auto`` with (each at its budget)
ALLOCATION_FIXED = ("4-2-2-4", "2", "3", "4")


def _beyond_section(
    args: argparse.Namespace,
    quick: bool,
    n: int,
    n_speed: int,
    reps: int,
    threads: Sequence[int],
    states: _States,
) -> dict[str, Any]:
    """Rotation, rANS and adaptive allocation (:mod:`fedquant.tools.bench.rotation`,
    :mod:`fedquant.tools.bench.entropy`, :mod:`fedquant.tools.bench.allocation`)."""
    from fedquant.tools.bench import allocation, entropy, rotation

    todo, skipped = states
    seed = args.seed
    rot_bits = (2, 4) if quick else rotation.BITS
    ent_bits = (2, 4) if quick else entropy.BITS
    fixed = ALLOCATION_FIXED[:1] if quick else ALLOCATION_FIXED
    out: dict[str, Any] = {
        "n": n,
        "n_speed": n_speed,
        "reps": reps,
        "rotation": {
            "synthetic": rotation.rotation_errors(n=n, bits=rot_bits, seed=seed),
            "models": {},
        },
        "entropy": {
            "synthetic": entropy.entropy_efficiency(n=n, bits=ent_bits, seed=seed),
            "models": {},
            "zstd": entropy.zstd_version(),
        },
        "allocation": {"fixed": list(fixed), "models": {}},
        "weights": {},
        "skipped": list(skipped),
    }
    for name, (state, info, source) in todo.items():
        out["weights"][name] = {"train": info, "source": source}
        out["rotation"]["models"][name] = rotation.rotation_weight_errors(
            state, name, bits=rot_bits, seed=seed
        )
        out["entropy"]["models"][name] = entropy.entropy_weight_efficiency(
            state, name, bits=ent_bits, seed=seed
        )
        try:
            rows = allocation.codec_comparison(state, fixed, repeats=1 if quick else 5, seed=seed)
        except FedquantError as e:  # e.g. a checkpoint with another number of layers
            out["skipped"].append(f"allocation on {name}: {e}")
            continue
        out["allocation"]["models"][name] = rows
    out["rotation"]["load_before"] = _load()
    out["rotation"]["speed"] = rotation.rotation_speed(
        n=n_speed, threads=threads, reps=reps, seed=seed
    )
    out["entropy"]["load_before"] = _load()
    out["entropy"]["speed"] = entropy.entropy_speed(
        n=n_speed, bits=(2, 4) if quick else (2, 4, 8), reps=reps, seed=seed
    )
    out["load_after"] = _load()
    return out


def _load() -> str:
    """The 1-minute load average (how busy the machine was), or "-" where unknown."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "-"


def _default_cache() -> Path:
    from fedquant.fl.data import default_cache_dir

    return Path(default_cache_dir())


def _untrained_state(model: str, seed: int) -> dict[str, np.ndarray]:
    import torch

    from fedquant.fl.models import PaperCNN
    from fedquant.tools.bench.weights import load_state

    torch.manual_seed(seed)
    shape = (1, 28, 28) if model == "mnist" else (3, 32, 32)
    return load_state(PaperCNN(shape, 10).state_dict())


def main(argv: Sequence[str] | None = None, prog: str = "fedquant bench") -> int:
    """Entry point of ``fedquant bench``; returns the exit status (0 ok, 2 bad options or a
    fedquant error)."""
    from fedquant.tools.bench import report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    command = " ".join([prog, *(shlex.quote(a) for a in argv)])
    try:
        results = run(args, command)
    except FedquantError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    js, md = report.save(results, args.out, args.markdown)
    # the report is rendered from the JSON as written (floats rounded there)
    results = json.loads(js.read_text())
    for figure, value in report.headline(results):
        print(f"{figure}: {value}")
    for row in report.peer_wins(results):
        print("lower NMSE than OCTAV: " + " ".join(row))
    for row in report.peer_speed_wins(results):
        print("faster than fedquant: " + " ".join(row))
    print(f"wrote {js} and {md}")
    return 0
