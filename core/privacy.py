"""Client-level differential privacy: the mechanisms of ``privacy.mechanism`` and their accounting.

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
noise multiplier to a target epsilon. A run's mechanism, as the config (``privacy``,
:class:`core.config.PrivacyConfig`) sets it, is a :class:`CentralDp` (``gaussian``; with an
:class:`AdaptiveClip`, ``adaptive_gaussian``: Andrew et al. 2021, arXiv:1905.03871) or a
:class:`LocalDp` (``local_gaussian``): the clip norm the workers apply, the noise added, the record
each evaluation reports. The Poisson cohorts are drawn by :class:`core.schedule.Schedule`, the
clipping in :mod:`core.worker`, the noise (central, or the sum of the local noises) and the
clip-norm updates in :mod:`core.server` (docs/privacy.md).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import dp_accounting
import numpy as np
import torch
from dp_accounting import pld, rdp

from core.errors import UserError
from core.seeding import run_draw_seed

ACCOUNTANTS = ("rdp", "pld")
CENTRAL = ("gaussian", "adaptive_gaussian")  # the mechanisms that noise the sum on the server
LOCAL = ("local_gaussian",)  # the mechanisms whose noise is each client's own (summed on the server)
LARGEST_NOISE = 1e4  # calibration searches noise multipliers up to this: beyond it nothing trains
NOISE_STREAM = 0xD9  # tells the server's noise of a round apart from every other draw of (seed, round)
COUNT_STREAM = 0xDA  # the noise on a round's count of unclipped clients (adaptive clipping)
LOCAL_STREAM = 0xDB  # the sum of a round's client noises (local DP)


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
    return _spent(schedule.event(), delta, accountant)


def _spent(event: dp_accounting.DpEvent, delta: float, accountant: str) -> float:
    """The epsilon at ``delta`` of ``event`` under a fresh ``accountant`` (its warnings kept quiet)."""
    with _quiet_library():
        return float(_accountant(accountant).compose(event).get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, sampling_rate: float, rounds: int,
                    accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to dp-accounting's tolerance, 1e-6) whose ``rounds`` rounds at
    ``sampling_rate`` spend at most ``target_epsilon`` at ``delta``: the library's calibration, which
    returns a value on the private side of the target.

    Raises:
        ValueError: ``target_epsilon`` <= 0, ``delta`` outside (0, 1), an unknown accountant.
        UserError: no noise multiplier up to ``LARGEST_NOISE`` reaches the target.
    """
    DpSchedule(1.0, sampling_rate, rounds)  # checks the rate and rounds
    return _calibrate(lambda z: DpSchedule(z, sampling_rate, rounds).event(), target_epsilon, delta, accountant,
                      f"in {rounds} rounds (sampling rate {sampling_rate:g}); raise the target, or lower the rounds "
                      f"or the cohort")


def _calibrate(event_of, target_epsilon: float, delta: float, accountant: str, where: str) -> float:
    """dp-accounting's calibration of the noise multiplier ``z`` of ``event_of(z)`` (a DpEvent) to
    ``target_epsilon`` at ``delta``; ``where`` ends the refusal line. Raises as :func:`calibrate_noise`."""
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon {target_epsilon}: must be > 0")
    _check_delta(delta)
    if _spent(event_of(LARGEST_NOISE), delta, accountant) > target_epsilon:
        raise UserError(f"privacy.target_epsilon: no noise multiplier up to {LARGEST_NOISE:g} reaches epsilon "
                        f"{target_epsilon:g} at delta {delta:g} {where}")
    with _quiet_library():
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant), event_of, target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(0.0, LARGEST_NOISE)))


def local_event(noise_multiplier: float, releases: int) -> dp_accounting.DpEvent:
    """One client's ``releases`` updates under local DP: each a Gaussian mechanism with noise std
    ``z * C`` on an update clipped to L2 norm ``C``. Any two clipped updates of the client differ by
    at most ``2 C``, so each release is a Gaussian of noise multiplier ``z / 2`` (replace-one
    adjacency of the client's data); the releases compose without subsampling (the server sees
    which clients sent)."""
    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier / 2), releases)


def local_epsilon(noise_multiplier: float, releases: int, delta: float, accountant: str = "rdp") -> float:
    """The epsilon (at ``delta``) of one client after ``releases`` local-DP updates (:func:`local_event`);
    0 before its first, ``inf`` without noise.

    Raises:
        ValueError: ``delta`` outside (0, 1), an unknown accountant.
    """
    _check_delta(delta)
    if releases < 1:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    return _spent(local_event(noise_multiplier, releases), delta, accountant)


def clip_factor(norm: float, clip_norm: float) -> float:
    """``min(1, clip_norm / norm)``: the factor that brings an update of L2 norm ``norm`` to at most
    ``clip_norm`` (1 for a zero update). Both in the update's units; a host float."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


def _gaussian(numel: int, std: float, seed: int, round_idx: int, stream: int) -> torch.Tensor:
    """(numel,) float64 CPU draws of N(0, std^2) for the whole run in round ``round_idx``, from a CPU
    generator seeded by :func:`core.seeding.run_draw_seed` (seed, round, ``stream``): the same bits
    for any number of processes and devices, and after a resume. The standard normals are drawn in
    float32 (torch's CPU float32 sampler is vectorized: 1.6M take 6-8 ms on one EPYC thread, 29 ms
    in float64) and scaled by ``std`` in float64; they are added to a float64 sum that the global
    model then rounds to float32."""
    generator = torch.Generator().manual_seed(run_draw_seed(seed, round_idx, stream))
    return torch.randn(numel, generator=generator, dtype=torch.float32).double().mul_(std)


@dataclass(frozen=True)
class AdaptiveClip:
    """Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
    Clipping", arXiv:1905.03871, Algorithm 1 with the geometric update).

    After each round the clip norm moves toward the ``target_quantile`` of the cohort's update norms:
    ``C <- C * exp(-learning_rate * (b - target_quantile))``, with ``b`` the noised share of summed
    clients whose update norm was at most ``C``. The share is privatized as in the paper: the sum of
    ``indicator - 1/2`` over the summed clients (L2 sensitivity 1/2) gets Gaussian noise of std
    ``count_stddev`` (for the simulated cohort ``M``; ``count_stddev * E / M`` on the ``E`` clients
    trained, as the update's noise is scaled), then ``b = noised sum / E + 1/2``.

    Attributes:
        target_quantile: ``gamma`` in (0, 1).
        learning_rate: ``eta_C`` > 0, the step in log space.
        count_stddev: ``sigma_b`` > 0, in clients of the simulated cohort.
    """

    target_quantile: float
    learning_rate: float
    count_stddev: float

    def next_clip_norm(self, clip_norm: float, unclipped: int, summed: int, dp: "CentralDp", seed: int,
                       round_idx: int) -> float:
        """The clip norm of the round after ``round_idx`` (a float32 value), whose ``summed`` client
        updates had ``unclipped`` of norm at most ``clip_norm`` (the count noise drawn from (seed, round))."""
        std = self.count_stddev * dp.expected_cohort / dp.noise_cohort
        noise = float(_gaussian(1, std, seed, round_idx, COUNT_STREAM)[0])
        share = (unclipped - summed / 2 + noise) / dp.expected_cohort + 0.5
        # rounded to float32: the value the workers receive (core.messages.round_broadcast) is the one noised
        return float(np.float32(clip_norm * math.exp(-self.learning_rate * (share - self.target_quantile))))


@dataclass(frozen=True)
class CentralDp:
    """A run's central DP-FedAvg mechanism (McMahan et al. 2018, arXiv:1710.06963), with adaptive
    clipping when ``adaptive`` is set (Andrew et al. 2021, arXiv:1905.03871).

    Attributes:
        clip_norm: ``C``, the L2 bound of each client's update of the shared parameters (adaptive:
            the bound of round 1).
        noise_multiplier: ``z`` (>= 0), as configured or calibrated to a target epsilon: the whole
            mechanism's (adaptive: the update's and the count's noise together, Theorem 1).
        expected_cohort: ``E``, the expected cohort (server_config.num_clients_per_iteration); the sum
            of clipped updates is divided by it, a fixed denominator.
        noise_cohort: ``M`` >= E, the cohort whose noise is simulated (privacy.noise_cohort_size, or E).
        population: ``N``, the clients the epsilon assumes (privacy.population, or data_config.num_clients).
        delta: the delta of (epsilon, delta)-DP.
        accountant: ``rdp`` or ``pld``.
        adaptive: the clip norm's update rule; None: ``C`` fixed.

    Raises:
        UserError: adaptive with ``2 * count_stddev <= z`` (the count alone would spend more than the
            whole budget).
    """

    clip_norm: float
    noise_multiplier: float
    expected_cohort: int
    noise_cohort: int
    population: int
    delta: float
    accountant: str
    adaptive: AdaptiveClip | None = None

    def __post_init__(self):
        if self.adaptive is not None and self.noise_multiplier and not 2 * self.adaptive.count_stddev > self.noise_multiplier:
            raise UserError(f"privacy.clipped_count_stddev {self.adaptive.count_stddev:g}: must be above half the noise "
                            f"multiplier ({self.noise_multiplier:.4g} / 2), or the count alone spends the whole "
                            f"epsilon; raise it (the paper's choice is noise_cohort_size / 20)")

    @property
    def sampling_rate(self) -> float:
        """``q = M / N``: the Poisson sampling rate the epsilon assumes."""
        return self.noise_cohort / self.population

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier of the sum of clipped updates: ``z``, or with adaptive clipping
        ``(z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al. 2021, Theorem 1), so that the update and
        the count together are a Gaussian mechanism of multiplier ``z``."""
        if self.adaptive is None or self.noise_multiplier == 0:
            return self.noise_multiplier
        return (self.noise_multiplier ** -2 - (2 * self.adaptive.count_stddev) ** -2) ** -0.5

    def noise_std(self, clip_norm: float | None = None) -> float:
        """Std of the Gaussian noise added to each shared coordinate of the sum of updates clipped to
        ``clip_norm`` (default :attr:`clip_norm`): ``z_update * C * E / M``, in the update's units."""
        clip = self.clip_norm if clip_norm is None else clip_norm
        return self.update_noise_multiplier * clip * self.expected_cohort / self.noise_cohort

    def epsilon(self, rounds: int) -> float:
        """The epsilon spent after ``rounds`` rounds (``inf`` without noise; 0 before round 1)."""
        if rounds < 1:
            return 0.0
        return epsilon(DpSchedule(self.noise_multiplier, self.sampling_rate, rounds), self.delta, self.accountant)

    def noise(self, seed: int, round_idx: int, numel: int, clip_norm: float | None = None) -> torch.Tensor:
        """(numel,) float64 CPU noise of round ``round_idx`` for updates clipped to ``clip_norm``:
        N(0, noise_std^2) per entry, drawn from a CPU generator seeded by (seed, round,
        :data:`NOISE_STREAM`), so it is the same bits for any number of processes and devices, and a
        resumed run draws what an uninterrupted one does."""
        return _gaussian(numel, self.noise_std(clip_norm), seed, round_idx, NOISE_STREAM)

    def record(self, rounds: int, clipped_share: float | None, clip_norm: float | None = None) -> dict:
        """The ``privacy`` entry of an evaluation record after ``rounds`` rounds; ``clipped_share``:
        the share of summed client updates that were clipped since the last evaluation (None: none
        was summed); ``clip_norm``: the bound of the last round (default :attr:`clip_norm`)."""
        return {"mechanism": "adaptive_gaussian" if self.adaptive else "gaussian", "epsilon": self.epsilon(rounds),
                "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.clip_norm if clip_norm is None else clip_norm, "clipped_share": clipped_share,
                "accountant": self.accountant, "sampling_rate": self.sampling_rate, "population": self.population}


@dataclass(frozen=True)
class LocalDp:
    """Local DP: each client clips its update of the shared parameters to L2 norm ``C`` and adds
    Gaussian noise of std ``z * C`` to every shared coordinate before the update leaves it. The
    simulation clips on the workers and draws the sum of the cohort's noises once, on the server
    (:meth:`noise`; the same distribution as the server averaging the noised updates). Each client's
    epsilon composes its own releases (:func:`local_event`); a run reports the largest, that of the
    client that has sent the most updates so far.

    Attributes:
        clip_norm: ``C``. noise_multiplier: ``z`` >= 0. delta, accountant: as :class:`CentralDp`.
        releases: (rounds + 1,) the most updates any one client has sent after each round (index 0:
            before round 1), from the run's cohorts.
    """

    clip_norm: float
    noise_multiplier: float
    delta: float
    accountant: str
    releases: tuple[int, ...]

    def epsilon(self, rounds: int) -> float:
        """The largest client epsilon after ``rounds`` rounds (0 before any update, ``inf`` without noise)."""
        return local_epsilon(self.noise_multiplier, self.releases[rounds], self.delta, self.accountant)

    def noise(self, seed: int, round_idx: int, numel: int, weights) -> torch.Tensor:
        """(numel,) float64 CPU noise of round ``round_idx``: the sum ``sum_i w_i n_i`` of the kept
        clients' own noises, each ``n_i ~ N(0, (z C)^2)`` per entry, weighted as their updates are
        (``weights``: the kept clients' aggregation weights). A sum of independent Gaussians is
        Gaussian, so it is drawn at once as ``N(0, (z C)^2 sum_i w_i^2)`` per entry: the distribution
        of drawing every client's (the server only ever reads the weighted sum), at the cost of one
        draw a round instead of one a client. From (seed, round, :data:`LOCAL_STREAM`) on the CPU:
        the same bits for any number of processes and devices, and after a resume."""
        std = self.noise_multiplier * self.clip_norm * math.sqrt(math.fsum(float(w) ** 2 for w in weights))
        return _gaussian(numel, std, seed, round_idx, LOCAL_STREAM)

    def record(self, rounds: int, clipped_share: float | None, clip_norm: float | None = None) -> dict:
        """The ``privacy`` entry of an evaluation record after ``rounds`` rounds (see :meth:`CentralDp.record`)."""
        return {"mechanism": "local_gaussian", "epsilon": self.epsilon(rounds), "delta": self.delta,
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "clipped_share": clipped_share, "accountant": self.accountant,
                "releases": self.releases[rounds]}


Mechanism = CentralDp | LocalDp


def delta_caveat(cfg) -> str | None:
    """A sentence when a central mechanism's ``privacy.delta`` (of a :class:`core.config.Config`) is
    not below 1 / population (the clients the epsilon assumes): such a delta admits a mechanism that
    publishes one client's data whole. None otherwise (a local client's delta is its own)."""
    dp = cfg.privacy
    if dp.mechanism not in CENTRAL:
        return None
    population = dp.population_of(cfg.data_config.num_clients)
    if dp.delta < 1 / population:
        return None
    return (f"privacy.delta {dp.delta:g} is not below 1 / population (1/{population}): an (epsilon, delta) "
            f"guarantee at this delta still allows one client's data to be published whole; for a meaningful "
            f"guarantee use e.g. {10 ** math.floor(math.log10(0.1 / population)):g}")


def most_releases(schedule) -> tuple[int, ...]:
    """(rounds + 1,) the most cohorts any one client has joined after each round of ``schedule``
    (:class:`core.schedule.Schedule`); index 0 is 0."""
    counts = np.zeros(schedule.num_clients, dtype=np.int64)
    most = [0]
    for r in range(1, schedule.rounds + 1):
        counts[schedule.cohort(r)] += 1
        most.append(int(counts.max()))
    return tuple(most)


def mechanism_of(cfg, schedule, noise_multiplier: float | None = None) -> Mechanism | None:
    """The mechanism of a config (:class:`core.config.Config`) and its ``schedule``; None without DP.
    The noise multiplier is ``noise_multiplier`` when given (a resumed run's), else the configured
    one, else calibrated to ``privacy.target_epsilon`` for ``server_config.max_iteration`` rounds.

    Raises:
        UserError: no noise multiplier reaches the target epsilon (:func:`calibrate_noise`); an
            adaptive count noise too small for the noise multiplier (:class:`CentralDp`).
    """
    dp = cfg.privacy
    if dp.mechanism in LOCAL:
        releases = most_releases(schedule)
        if noise_multiplier is None:
            noise_multiplier = dp.noise_multiplier
        if noise_multiplier is None:
            noise_multiplier = _calibrate(lambda z: local_event(z, releases[-1]), dp.target_epsilon, dp.delta,
                                          dp.accountant, f"for a client that sends {releases[-1]} updates; raise "
                                          f"the target, or lower the rounds or the cohort")
        return LocalDp(dp.clip_norm, noise_multiplier, dp.delta, dp.accountant, releases)
    return central_dp(cfg, noise_multiplier)


def central_dp(cfg, noise_multiplier: float | None = None) -> CentralDp | None:
    """The central mechanism of a config (:class:`core.config.Config`) whose ``privacy.mechanism`` is
    ``gaussian`` or ``adaptive_gaussian``; None otherwise. The noise multiplier as in
    :func:`mechanism_of`.

    Raises:
        UserError: see :func:`mechanism_of`.
    """
    dp = cfg.privacy
    if dp.mechanism not in CENTRAL:
        return None
    cohort = cfg.server_config.num_clients_per_iteration
    population = dp.population_of(cfg.data_config.num_clients)
    noise_cohort = dp.noise_cohort_of(cohort)
    if noise_multiplier is None:
        noise_multiplier = dp.noise_multiplier
    if noise_multiplier is None:
        noise_multiplier = calibrate_noise(dp.target_epsilon, dp.delta, noise_cohort / population,
                                           cfg.server_config.max_iteration, dp.accountant)
    assert math.isfinite(noise_multiplier)
    adaptive = None
    if dp.mechanism == "adaptive_gaussian":
        count_stddev = dp.clipped_count_stddev if dp.clipped_count_stddev is not None else noise_cohort / 20
        adaptive = AdaptiveClip(dp.target_unclipped_quantile, dp.clip_learning_rate, count_stddev)
    return CentralDp(dp.clip_norm, noise_multiplier, cohort, noise_cohort, population, dp.delta, dp.accountant,
                     adaptive)
