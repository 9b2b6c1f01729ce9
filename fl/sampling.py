"""Seeded client sampling (Flower's strategies call the unseeded ``random.sample``).

A round's sample depends only on (run seed, round, purpose): the same seed picks the same
partitions on every engine, in every process.
"""

from __future__ import annotations

import numpy as np

PURPOSES = {"train": 0, "evaluate": 1}


def sample_partitions(seed: int, server_round: int, purpose: str, available: list[int], k: int) -> list[int]:
    """``k`` distinct partition ids out of ``available``, sorted, from a generator of its own."""
    if k > len(available):
        raise ValueError(f"cannot sample {k} clients out of {len(available)} available")
    rng = np.random.default_rng([seed, server_round, PURPOSES[purpose]])
    chosen = rng.choice(len(available), size=k, replace=False)
    ordered = sorted(available)
    return sorted(ordered[i] for i in chosen)


def seed_for(seed: int, server_round: int, partition: int) -> int:
    """The seed of one client's local work in one round (shuffling, dropout, augmentation)."""
    return int(np.random.SeedSequence([seed, server_round, partition]).generate_state(1, dtype=np.uint64)[0] >> 1)
