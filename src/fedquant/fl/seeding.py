"""Seed derivation: every random stream is a pure function of ``(seed, round, client, purpose)``.

Any round of any client can therefore be replayed on its own, and two runs with
the same seed draw identical numbers (on the same kind of machine).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Purpose(IntEnum):
    """What a derived stream is used for (part of the derivation key)."""

    INIT = 0  # global model initialization
    SAMPLE = 1  # which clients take part in a round
    SHUFFLE = 2  # a client's mini-batch order
    UPLINK = 3  # stochastic rounding of a client's upload
    DOWNLINK = 4  # stochastic rounding of the server's broadcast
    QAT = 5  # stochastic rounding inside quantization-aware training
    FAILURE = 6  # simulated client failures
    PARTITION = 7  # data partitioning
    HOSTILE = 8  # which clients are hostile (robustness experiments)
    ROTATION = 9  # the shared key of the uplink's random rotation (same for all clients)
    CLIENT_BITS = 10  # which clients upload at which width (client_bits)


SERVER = 2**31 - 1  # the "client id" used for server-side streams


def seed_sequence(
    seed: int, purpose: Purpose, round_: int = 0, client: int = SERVER
) -> np.random.SeedSequence:
    """The SeedSequence for one ``(seed, purpose, round, client)``."""
    return np.random.SeedSequence(
        entropy=int(seed), spawn_key=(int(purpose), int(round_), int(client))
    )


def numpy_rng(
    seed: int, purpose: Purpose, round_: int = 0, client: int = SERVER
) -> np.random.Generator:
    return np.random.default_rng(seed_sequence(seed, purpose, round_, client))


def torch_generator(
    seed: int, purpose: Purpose, round_: int = 0, client: int = SERVER
) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(
        int(
            seed_sequence(seed, purpose, round_, client).generate_state(1, np.uint64)[0]
            >> np.uint64(1)
        )
    )
    return g


def int_seed(seed: int, purpose: Purpose, round_: int = 0, client: int = SERVER) -> int:
    """A 63-bit integer seed (for APIs that take an int)."""
    return int(
        seed_sequence(seed, purpose, round_, client).generate_state(1, np.uint64)[0] >> np.uint64(1)
    )


def rotation_key(seed: int, round_: int) -> int:
    """The shared 64-bit rotation key of a round (:mod:`fedquant.quant.rotation`).

    Every client of the round and the server derive the same key, so the
    rotation's signs never travel; a new round draws new signs.
    """
    return int(seed_sequence(seed, Purpose.ROTATION, round_).generate_state(1, np.uint64)[0])
