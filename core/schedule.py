"""What happens in which round: a pure function of the config, computed identically on every rank."""
from __future__ import annotations

import numpy as np

from core.cohort import sample_cohort
from core.config import cohort_range
from core.seeding import derive_seed


POISSON_STREAM = 0xB1  # the draw of a Poisson cohort's size, apart from every other draw of (seed, round)


class Schedule:
    """Rounds are numbered 1..``rounds``; round r's cohort depends only on (seed, r).

    With ``poisson`` (central DP, :mod:`core.privacy`) every client joins round r's cohort
    independently with probability ``q = num_clients_per_iteration / num_clients``: the cohort's size
    is drawn from Binomial(num_clients, q) and the cohort is then a uniform subset of that size, both
    from (seed, r). A round may then have an empty cohort.
    """

    def __init__(self, server_config, num_clients: int, seed: int, poisson: bool = False):
        self.rounds = server_config.max_iteration
        self.cohort_range = cohort_range(server_config.num_clients_per_iteration)
        self.val_freq = server_config.val_freq
        self.ckpt_freq = server_config.ckpt_freq
        self.num_clients = num_clients
        self.seed = seed
        self.poisson = poisson

    @property
    def sampling_rate(self) -> float:
        """``q``, the probability that a client joins a Poisson cohort: the expected cohort (the low
        end of the configured size) over the number of clients."""
        return min(1.0, self.cohort_range[0] / self.num_clients)

    def cohort_size(self, round_idx: int) -> int:
        """Clients in round ``round_idx``: fixed, drawn from the configured range by (seed, round), or
        (``poisson``) drawn from Binomial(num_clients, q) by (seed, round), possibly 0."""
        low, high = self.cohort_range
        if self.poisson:
            rng = np.random.default_rng(derive_seed(self.seed, round_idx, POISSON_STREAM))
            return int(rng.binomial(self.num_clients, self.sampling_rate))
        if low != high:
            low = int(np.random.default_rng(derive_seed(self.seed, round_idx, 0xC5)).integers(low, high + 1))
        return min(low, self.num_clients)

    def cohort(self, round_idx: int) -> np.ndarray:
        """(cohort_size(round_idx),) sorted client ids of ``round_idx``."""
        return sample_cohort(self.seed, round_idx, self.num_clients, self.cohort_size(round_idx))

    def is_eval_round(self, round_idx: int) -> bool:
        """True every ``val_freq`` rounds and at the last round."""
        return round_idx % self.val_freq == 0 or round_idx == self.rounds

    def is_ckpt_round(self, round_idx: int) -> bool:
        """True every ``ckpt_freq`` rounds (never when 0) and at the last round."""
        return round_idx == self.rounds or (self.ckpt_freq > 0 and round_idx % self.ckpt_freq == 0)

    def trained_through(self, round_idx: int) -> set[int]:
        """Ids of every client sampled in rounds 1..``round_idx``."""
        seen: set[int] = set()
        for r in range(1, round_idx + 1):
            seen.update(self.cohort(r).tolist())
        return seen
