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
This module only builds the library's event for a schedule, asks for epsilon, and calibrates the
noise multiplier to a target epsilon. Wiring the mechanism into the round (clipping, noise,
Poisson cohorts) is not done yet: no config section uses this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

from core.errors import UserError

ACCOUNTANTS = ("rdp", "pld")
LARGEST_NOISE = 1e4  # calibration searches noise multipliers up to this: beyond it nothing trains


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


def epsilon(schedule: DpSchedule, delta: float, accountant: str = "rdp") -> float:
    """The epsilon (at ``delta``) of ``schedule`` under ``accountant`` (``rdp`` or ``pld``); ``inf``
    without noise.

    Raises:
        ValueError: ``delta`` outside (0, 1), an unknown accountant.
    """
    _check_delta(delta)
    if schedule.noise_multiplier == 0:
        return float("inf")
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
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant), lambda z: DpSchedule(z, sampling_rate, rounds).event(),
        target_epsilon, delta, dp_accounting.ExplicitBracketInterval(0.0, LARGEST_NOISE)))
