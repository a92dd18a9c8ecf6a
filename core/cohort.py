"""Cohort sampling and the deterministic split of a cohort across workers."""
from __future__ import annotations

import numpy as np

from core.seeding import derive_seed


def sample_cohort(seed: int, round_idx: int, num_clients: int, cohort_size: int) -> np.ndarray:
    """Sorted ids of the clients of round ``round_idx``: a pure function of (seed, round).

    Uniform without replacement; ``cohort_size`` larger than ``num_clients`` takes every client.
    """
    rng = np.random.default_rng(derive_seed(seed, round_idx, 0xC0407))
    size = min(cohort_size, num_clients)
    return np.sort(rng.choice(num_clients, size=size, replace=False)).astype(np.int64)


def balance(clients: np.ndarray, loads: np.ndarray, num_workers: int) -> list[np.ndarray]:
    """Greedy longest-processing-time split of ``clients`` over ``num_workers`` workers.

    Clients are taken by decreasing load (ties by id) and each goes to the least-loaded worker
    (ties by worker index). Every rank computes the same answer, so no assignment is sent.

    Args:
        clients: (K,) client ids. loads: (K,) work per client, e.g. samples.
    Returns:
        ``num_workers`` sorted id arrays.
    """
    order = np.lexsort((clients, -np.asarray(loads)))
    totals = np.zeros(num_workers)
    shares: list[list[int]] = [[] for _ in range(num_workers)]
    for k in order:
        w = int(np.argmin(totals))
        shares[w].append(int(clients[k]))
        totals[w] += loads[k]
    return [np.array(sorted(s), dtype=np.int64) for s in shares]
