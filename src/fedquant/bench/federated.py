"""Federated benchmarks (issue 6, part 3) -- the place reserved for them.

Part 3 measures what quantization does to federated training: test accuracy
and uploaded bytes per round in the paper's settings (``../shared/ANCHORS.md``:
30 IID clients, 200 rounds, per-layer bits ``4-2-2-4`` on MNIST and
``4-4-4-4`` on CIFAR-10) against float32 FedAvg and the peers of
:mod:`fedquant.bench.peers`. It builds on the simulator
(:class:`fedquant.fl.simulation.Simulation`) and is a task of its own: this
module then gets a ``federated_benchmark(...) -> list[dict]`` function,
:mod:`fedquant.bench.cli` runs it for ``--only federated`` (refused until
then) and :mod:`fedquant.bench.report` renders its section 4. The error
benchmark's real weights (:mod:`fedquant.bench.weights`, trained centrally
for now) can then come from federated runs.
"""

from __future__ import annotations

#: the section name reserved in ``--only``
SECTION = "federated"
AVAILABLE = False
