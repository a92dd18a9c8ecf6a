"""Client-level differential privacy: the privacy accountant (issue 25, first part).

The accounting of DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963): each round, every client joins
the cohort independently with probability ``q`` (Poisson sampling), each cohort client's update is
clipped to L2 norm ``C``, and Gaussian noise of standard deviation ``z * C`` is added once to the
sum of the clipped updates. One round is then a Poisson-subsampled Gaussian mechanism with noise
multiplier ``z`` (the noise std over the sum's L2 sensitivity ``C`` under adding or removing one
client), and ``rounds`` of them compose. The guarantee is (epsilon, delta)-DP of the whole sequence
of global models under add/remove-one-client adjacency.

The accounting itself is Google's ``dp-accounting`` library (``rdp``: its Renyi-DP accountant;
``pld``: its privacy-loss-distribution accountant, tighter); nothing here computes a privacy loss.
This module builds the library's event for a schedule, asks for epsilon, and calibrates the
noise multiplier to a target epsilon; :class:`CentralDp` is a run's mechanism as the config
(``privacy``, :class:`core.config.PrivacyConfig`) sets it: the clip factor the workers apply, the
noise the server adds, the record each evaluation reports. The Poisson cohorts are drawn by
:class:`core.schedule.Schedule`, the clipping in :mod:`core.worker`, the noise in :mod:`core.server`
(docs/privacy.md).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import dp_accounting
import torch
from dp_accounting import pld, rdp

from core.errors import UserError
from core.seeding import derive_seed

ACCOUNTANTS = ("rdp", "pld")
LARGEST_NOISE = 1e4  # calibration searches noise multipliers up to this: beyond it nothing trains
NOISE_STREAM = 0xD9  # tells the server's noise of a round apart from every other draw of (seed, round)


@dataclass(frozen=True)
class DpSchedule:
    """The DP rounds of a run, as the accountant sees them.

    Attributes:
        noise_multiplier: ``z``, the noise std on the sum of clipped updates over the clip norm
            (>= 0; 0 is no noise, infinite epsilon).
        sampling_rate: ``q``, the probability that a client joins a round's cohort, in (0, 1]
            (Poisson sampling: expected cohort / number of clients).
        rounds: the number of DP rounds (>= 1).

    Raises:
        ValueError: a field outside its range.
    """

    noise_multiplier: float
    sampling_rate: float
    rounds: int

    def __post_init__(self):
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise multiplier {self.noise_multiplier}: must be >= 0")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling rate {self.sampling_rate}: must be in (0, 1]")
        if self.rounds < 1:
            raise ValueError(f"rounds {self.rounds}: must be >= 1")

    def event(self) -> dp_accounting.DpEvent:
        """``rounds`` compositions of a Poisson-subsampled Gaussian: dp-accounting's description."""
        one = dp_accounting.PoissonSampledDpEvent(self.sampling_rate,
                                                  dp_accounting.GaussianDpEvent(self.noise_multiplier))
        return dp_accounting.SelfComposedDpEvent(one, self.rounds)


def _accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant (add/remove-one adjacency, the library's default)."""
    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"accountant {kind!r}: must be one of {', '.join(ACCOUNTANTS)}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta}: must be in (0, 1)")


@contextmanager
def _quiet_library():
    """dp-accounting's RDP accountant logs a warning for each Renyi order whose series does not
    converge (it leaves that order out, as it should); keep those off the run's console."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def epsilon(schedule: DpSchedule, delta: float, accountant: str = "rdp") -> float:
    """The epsilon (at ``delta``) of ``schedule`` under ``accountant`` (``rdp`` or ``pld``); ``inf``
    without noise.

    Raises:
        ValueError: ``delta`` outside (0, 1), an unknown accountant.
    """
    _check_delta(delta)
    if schedule.noise_multiplier == 0:
        return float("inf")
    with _quiet_library():
        return float(_accountant(accountant).compose(schedule.event()).get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, sampling_rate: float, rounds: int,
                    accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to dp-accounting's tolerance, 1e-6) whose ``rounds`` rounds at
    ``sampling_rate`` spend at most ``target_epsilon`` at ``delta``: the library's calibration, which
    returns a value on the private side of the target.

    Raises:
        ValueError: ``target_epsilon`` <= 0, ``delta`` outside (0, 1), an unknown accountant.
        UserError: no noise multiplier up to ``LARGEST_NOISE`` reaches the target.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon {target_epsilon}: must be > 0")
    _check_delta(delta)
    DpSchedule(1.0, sampling_rate, rounds)  # checks the rate and rounds
    if epsilon(DpSchedule(LARGEST_NOISE, sampling_rate, rounds), delta, accountant) > target_epsilon:
        raise UserError(f"privacy.target_epsilon: no noise multiplier up to {LARGEST_NOISE:g} reaches epsilon "
                        f"{target_epsilon:g} at delta {delta:g} in {rounds} rounds (sampling rate {sampling_rate:g}); "
                        f"raise the target, or lower the rounds or the cohort")
    with _quiet_library():
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant), lambda z: DpSchedule(z, sampling_rate, rounds).event(),
            target_epsilon, delta, dp_accounting.ExplicitBracketInterval(0.0, LARGEST_NOISE)))


def clip_factor(norm: float, clip_norm: float) -> float:
    """``min(1, clip_norm / norm)``: the factor that brings an update of L2 norm ``norm`` to at most
    ``clip_norm`` (1 for a zero update). Both in the update's units; a host float."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


@dataclass(frozen=True)
class CentralDp:
    """A run's central DP-FedAvg mechanism (McMahan et al. 2018, arXiv:1710.06963).

    Attributes:
        clip_norm: ``C``, the L2 bound of each client's update of the shared parameters.
        noise_multiplier: ``z`` (>= 0), as configured or calibrated to a target epsilon.
        expected_cohort: ``E``, the expected cohort (server_config.num_clients_per_iteration); the sum
            of clipped updates is divided by it, a fixed denominator.
        noise_cohort: ``M`` >= E, the cohort whose noise is simulated (privacy.noise_cohort_size, or E).
        population: ``N``, the clients the epsilon assumes (privacy.population, or data_config.num_clients).
        delta: the delta of (epsilon, delta)-DP.
        accountant: ``rdp`` or ``pld``.
    """

    clip_norm: float
    noise_multiplier: float
    expected_cohort: int
    noise_cohort: int
    population: int
    delta: float
    accountant: str

    @property
    def sampling_rate(self) -> float:
        """``q = M / N``: the Poisson sampling rate the epsilon assumes."""
        return self.noise_cohort / self.population

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise added to each shared coordinate of the sum of clipped updates:
        ``z * C * E / M`` (``z * C`` without a simulated cohort), in the update's units."""
        return self.noise_multiplier * self.clip_norm * self.expected_cohort / self.noise_cohort

    def epsilon(self, rounds: int) -> float:
        """The epsilon spent after ``rounds`` rounds (``inf`` without noise; 0 before round 1)."""
        if rounds < 1:
            return 0.0
        return epsilon(DpSchedule(self.noise_multiplier, self.sampling_rate, rounds), self.delta, self.accountant)

    def noise(self, seed: int, round_idx: int, numel: int) -> torch.Tensor:
        """(numel,) float64 CPU noise of round ``round_idx``: N(0, noise_std^2) per entry, drawn from a
        CPU generator seeded by (seed, round, :data:`NOISE_STREAM`), so it is the same bits for any
        number of processes and devices, and a resumed run draws what an uninterrupted one does."""
        generator = torch.Generator().manual_seed(derive_seed(seed, round_idx, NOISE_STREAM))
        return torch.randn(numel, generator=generator, dtype=torch.float64).mul_(self.noise_std)

    def record(self, rounds: int, clipped_share: float | None) -> dict:
        """The ``privacy`` entry of an evaluation record after ``rounds`` rounds; ``clipped_share``:
        the share of summed client updates that were clipped since the last evaluation (None: none
        was summed)."""
        return {"epsilon": self.epsilon(rounds), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.clip_norm, "clipped_share": clipped_share, "accountant": self.accountant,
                "sampling_rate": self.sampling_rate}


def central_dp(cfg, noise_multiplier: float | None = None) -> CentralDp | None:
    """The mechanism of a config (:class:`core.config.Config`) whose ``privacy.mechanism`` is
    ``gaussian``; None without DP. The noise multiplier is ``noise_multiplier`` when given (a resumed
    run's), else the configured one, else calibrated to ``privacy.target_epsilon`` for
    ``server_config.max_iteration`` rounds.

    Raises:
        UserError: no noise multiplier reaches the target epsilon (:func:`calibrate_noise`).
    """
    dp = cfg.privacy
    if dp.mechanism != "gaussian":
        return None
    cohort = cfg.server_config.num_clients_per_iteration
    population = dp.population if dp.population is not None else cfg.data_config.num_clients
    noise_cohort = dp.noise_cohort_size if dp.noise_cohort_size is not None else cohort
    if noise_multiplier is None:
        noise_multiplier = dp.noise_multiplier
    if noise_multiplier is None:
        noise_multiplier = calibrate_noise(dp.target_epsilon, dp.delta, noise_cohort / population,
                                           cfg.server_config.max_iteration, dp.accountant)
    assert math.isfinite(noise_multiplier)
    return CentralDp(dp.clip_norm, noise_multiplier, cohort, noise_cohort, population, dp.delta, dp.accountant)
