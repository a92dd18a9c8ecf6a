"""Order-independent sums of client updates: fixed point in int64 (issue 23).

Float addition is not associative, so a float32 sum of the clients' weighted deltas depends on which
rank trained which client and in what order: with 1 and 3 processes the global models differed by
about 3e-8 after one round, and training then amplified the difference round after round. Here each
client's term is first rounded to an integer number of units of ``2**-FRACTION_BITS``, a function of
that client alone, and the integers are added in int64, which is associative: any split of the
cohort over ranks, in any order, gives the same sum bit for bit, and so does the reduce (an int64
sum over ranks, which gloo and NCCL support).

What is summed (per cohort client i of K, weights ``w_i`` known before training: train samples or
1, shares ``p_i = w_i / sum_K(w)``):

- the delta ``round(p_i * (trained_i - global) * 2**40)``, each entry as the float64 product of the
  float32 delta and the float64 share, rounded to the nearest integer (ties to even);
- SCAFFOLD's change of the client's control variate, ``round(change_i * 2**(40 - b))`` with
  ``b = ceil(log2 K)`` (a plain sum, not weighted: ``2**-b`` keeps K terms in range).

Range and resolution: every entry of a client's delta (personal layers included) and of its state
change must satisfy ``|x| < RANGE = 2**22`` (about 4.2e6); then each term is below ``2**62`` in
magnitude and every partial sum fits int64 (the shares sum to 1). A client outside the range is
dropped and counted exactly as a client whose update is not finite (NaN fails the check too), never
summed with an overflow. The resolution is ``2**-40`` (about 9.1e-13) per term for the delta, and
``2**-(40 - b)`` for the state change. BatchNorm statistics travel in the delta: running variances
that move by up to 4e6 in a round, and ``num_batches_tracked`` deltas of up to 4e6 steps a round, fit.

The server (:meth:`core.worker.RoundLayout.reduce_parts`) turns the sums back into floats: the
delta sum in float64, divided by the kept clients' weight in float64 and rounded once to float32;
the state change sum to float32. The clients' mean training losses (metrics only) travel one per
client and are averaged with ``math.fsum`` in cohort order, so the reported loss does not depend on
the split either.

Only the sum is order-independent: each client's own training must be bit-identical too, which holds
for a fixed number of threads per process on one device and library version. A different thread
count (or device, or torch / oneDNN / cuDNN version) changes each client's training, so the result.
"""
from __future__ import annotations

import math

import numpy as np
import torch

FRACTION_BITS = 40
RANGE = 2.0 ** 22
CHUNK = 1 << 18  # entries converted per pass (the float64 and int64 scratch stay in the cache)
MAGIC = 1.5 * 2.0 ** 52  # v + MAGIC is an integer held in the low bits (ties to even) when |v| < 2**51
MAGIC_BITS = int(np.array(MAGIC).view(np.int64))  # the bits of MAGIC as int64


def state_change_bits(cohort_size: int) -> int:
    """Fraction bits of the summed strategy-state change: ``FRACTION_BITS - ceil(log2 K)``, so K terms
    below ``RANGE`` each stay within int64."""
    return FRACTION_BITS - math.ceil(math.log2(max(cohort_size, 1)))


def within_range(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bool (0-dim, or per row along ``dim``): every entry of ``x`` is finite and ``|x| < RANGE``
    (NaN fails: the minimum and maximum propagate it). No host sync."""
    lo, hi = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim)
    return (lo > -RANGE) & (hi < RANGE)


def decode(fixed: torch.Tensor, bits: int = FRACTION_BITS) -> torch.Tensor:
    """float64 value of an int64 fixed-point sum (``fixed * 2**-bits``; exact below 2**53 units)."""
    return fixed.double() * 2.0 ** -bits


class FixedPointSums:
    """A rank's fixed-point sums of one round: the weighted delta sum (N,) and the strategy-state
    change sum (S,), both int64 views into its reduce buffer (see :class:`core.worker.RoundLayout`).

    The caller writes a client's float32 delta into :attr:`delta` (trained minus global) and calls
    :meth:`add_`; a vectorized group goes through :meth:`add_rows_`. Each gives a client the same
    integers for the same float32 delta: ``v = float64(x) * scale`` (one IEEE product), rounded to
    the nearest integer, ties to even.

    On the CPU the range check is read on the host (free there): a refused client costs nothing
    more, and when every ``|v|`` is below 2**51 (``|p_i * x| < 2048`` at 40 fraction bits, nearly
    always) the rounding is one float64 addition of ``MAGIC`` (the sum's last bit is then worth 1,
    so the addition rounds ``v`` to an integer, ties to even, which the low bits hold) instead of
    torch's float-to-int64 conversion, and the int64 additions go through numpy (torch's CPU int64
    addition multiplies by its ``alpha``): the conversion of a 1.6M-entry delta took 1.6 ms instead
    of 3.6 ms (one thread of a 2-core AMD EPYC; benchmarks/RESULTS.md). On other devices (or with ``sync_free``) nothing
    waits for the device: a refused client's terms are masked to 0 before the conversion.

    Memory: a float32 copy of the delta (N) and float64 / int64 scratch of at most ``CHUNK`` entries.
    """

    def __init__(self, delta_sum: torch.Tensor, state_sum: torch.Tensor, cohort_size: int,
                 sync_free: bool | None = None):
        device = delta_sum.device
        self.delta_sum, self.state_sum = delta_sum, state_sum
        self._delta: torch.Tensor | None = None
        self.state_scale = 2.0 ** state_change_bits(cohort_size)
        self.sync_free = device.type != "cpu" if sync_free is None else sync_free
        size = min(CHUNK, max(delta_sum.numel(), state_sum.numel()))
        self._f64 = torch.empty(size, dtype=torch.float64, device=device)
        self._i64 = torch.empty(size, dtype=torch.int64, device=device)

    @property
    def delta(self) -> torch.Tensor:
        """(N,) float32 scratch for one client's delta (made at first use: a vectorized share never
        needs it)."""
        if self._delta is None:
            self._delta = torch.empty(self.delta_sum.numel(), device=self.delta_sum.device)
        return self._delta

    def add_(self, ok: torch.Tensor, share: float, change: torch.Tensor | None = None) -> torch.Tensor:
        """Add one client: ``round(share * 2**40 * delta)`` to the delta sum and, with ``change``
        (its (S,) float32 strategy-state change), ``round(2**(40 - b) * change)`` to the state sum;
        both or neither.

        Args:
            ok: 0-dim bool, False when the client is dropped already (not finite).
            share: the client's ``p_i`` (a host float64).
        Returns:
            0-dim bool on the device: whether the client was added (``ok`` and every entry in range).
        """
        return self._add(self.delta, self.delta_sum, ok, share, change)

    def add_rows_(self, deltas: torch.Tensor, ok: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
        """Add a group of clients: ``deltas`` (C, k) float32 (the parameter part), ``ok`` (C,) bool,
        ``shares`` (C,) float64 on the device. Each row gets the terms :meth:`add_` gives the same
        delta, added into the first k entries of the delta sum (on the device: all rows at once,
        summed in int64). Returns the (C,) bool of the clients added (``ok`` and every entry in
        range). No host sync on a device."""
        k = deltas.shape[1]
        if not self.sync_free:
            return torch.stack([self._add(row, self.delta_sum[:k], row_ok, share, None)
                                for row, row_ok, share in zip(deltas, ok, shares.tolist())])
        keep = ok & within_range(deltas, dim=1)
        scale = (shares * 2.0 ** FRACTION_BITS).unsqueeze(1)
        step = max(1, CHUNK // max(1, deltas.shape[0]))
        for start in range(0, k, step):
            part = deltas[:, start:start + step].double().mul_(scale)
            part.masked_fill_(~keep.unsqueeze(1), 0.0)
            self.delta_sum[start:start + step].add_(part.round_().long().sum(0))
        return keep

    def _add(self, delta: torch.Tensor, delta_sum: torch.Tensor, ok: torch.Tensor, share: float,
             change: torch.Tensor | None) -> torch.Tensor:
        """:meth:`add_` for any (M,) ``delta`` and (M,) int64 ``delta_sum``."""
        scale = share * 2.0 ** FRACTION_BITS
        if self.sync_free:
            keep = ok & within_range(delta)
            if change is not None:
                keep = keep & within_range(change)
            self._to_fixed_(delta_sum, delta, scale, keep)
            if change is not None:
                self._to_fixed_(self.state_sum, change, self.state_scale, keep)
            return keep
        largest, largest_change = _max_abs(delta), _max_abs(change) if change is not None else 0.0
        if not (bool(ok) and largest < RANGE and largest_change < RANGE):  # NaN compares False
            return torch.zeros((), dtype=torch.bool, device=delta.device)
        self._to_fixed_host_(delta_sum, delta, scale, largest * scale < 2.0 ** 51)
        if change is not None:
            small = largest_change * self.state_scale < 2.0 ** 51
            self._to_fixed_host_(self.state_sum, change, self.state_scale, small)
        return torch.ones((), dtype=torch.bool, device=delta.device)

    def _to_fixed_(self, acc: torch.Tensor, x: torch.Tensor, scale: float, keep: torch.Tensor) -> None:
        """``acc += round(x * scale)`` in int64 on the device, ``CHUNK`` entries at a time; ``keep``
        False (0-dim, on the device) adds 0 (NaN or inf in ``x`` included)."""
        for start in range(0, x.numel(), CHUNK):
            part = x[start:start + CHUNK]
            f64, i64 = self._f64[:part.numel()], self._i64[:part.numel()]
            f64.copy_(part)
            f64.mul_(scale)
            f64.masked_fill_(~keep, 0.0)
            f64.round_()
            i64.copy_(f64)
            acc[start:start + CHUNK].add_(i64)

    def _to_fixed_host_(self, acc: torch.Tensor, x: torch.Tensor, scale: float, small: bool) -> None:
        """:meth:`_to_fixed_` for CPU tensors of finite ``x`` in range; ``small``: every
        ``|x * scale|`` is below 2**51, so ``MAGIC`` rounds."""
        acc_np = acc.numpy()
        for start in range(0, x.numel(), CHUNK):
            part = x[start:start + CHUNK]
            m = part.numel()
            f64 = self._f64[:m]
            f64.copy_(part)
            f64.mul_(scale)
            if small:
                f64.add_(MAGIC)
                ints = f64.numpy().view(np.int64)
                np.subtract(ints, MAGIC_BITS, out=ints)
            else:
                f64.round_()
                self._i64[:m].copy_(f64)
                ints = self._i64[:m].numpy()
            np.add(acc_np[start:start + m], ints, out=acc_np[start:start + m])


def _max_abs(x: torch.Tensor) -> float:
    """Largest ``|entry|`` of a CPU tensor as a host float (NaN when any entry is NaN)."""
    low, high = (float(v) for v in torch.aminmax(x))
    return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)
