"""The weighted mean of client deltas at 1,000 clients, against a float64 reference.

Issue 23: summing whole float32 weights and subtracting the weight sum times the global model at the
end rounds every weight to float32 (about 6e-8 near 1), which at 1,000 clients and updates near
1e-5 put 2.3e-6 of error into a 1e-5 update. The delta-first sum of
:meth:`core.flat.StateLayout.accumulate_delta_` must stay within 1e-7 absolute or 1% of the update,
whichever is larger.
"""
from __future__ import annotations

import torch
from torch import nn

from core.flat import StateLayout

CLIENTS = 1000


def _clients(seed: int, scale: float):
    """A small module whose global state is ~N(0, 1), and 1,000 clients' trained float32 states: the
    global one plus a common drift of ``scale`` and per-client noise of ``scale``; sample weights
    1..500."""
    gen = torch.Generator().manual_seed(seed)
    module = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    layout = StateLayout(module)
    start = torch.randn(layout.numel, generator=gen)
    drift = scale * torch.randn(layout.numel, generator=gen)
    trained = [start + drift + scale * torch.randn(layout.numel, generator=gen) for _ in range(CLIENTS)]
    weights = torch.randint(1, 501, (CLIENTS,), generator=gen).tolist()
    return layout, start, trained, weights


def _mean_delta(layout, start, trained, weights, as_tensor: bool) -> torch.Tensor:
    out = torch.zeros(layout.numel)
    for state, w in zip(trained, weights):
        layout.load_(state)
        layout.accumulate_delta_(out, torch.tensor(float(w)) if as_tensor else float(w), start)
    return out / sum(weights)


def _reference(start, trained, weights) -> torch.Tensor:
    """float64: the trained float32 states and the global one are exact in float64."""
    total = sum(w * (s.double() - start.double()) for s, w in zip(trained, weights))
    return total / sum(weights)


def test_mean_delta_at_1000_clients_is_within_1e_7_of_float64():
    for seed, scale in [(0, 1e-5), (1, 1e-3)]:
        layout, start, trained, weights = _clients(seed, scale)
        reference = _reference(start, trained, weights)
        bound = max(1e-7, 0.01 * float(reference.abs().max()))
        for as_tensor in (False, True):  # a host float weight (samples) and a device tensor (DGA)
            error = float((_mean_delta(layout, start, trained, weights, as_tensor).double() - reference).abs().max())
            assert error <= bound, (f"updates ~{scale:g}, {CLIENTS} clients, weight as tensor {as_tensor}: "
                                    f"max |mean delta - float64| {error:.3g} > bound {bound:.3g}")


def test_the_old_whole_weight_sum_misses_the_bound():
    """The same data through the old form (sum of weighted whole weights minus weight sum x global):
    the bound above is tight enough to tell the two apart."""
    layout, start, trained, weights = _clients(0, 1e-5)
    reference = _reference(start, trained, weights)
    total = torch.zeros(layout.numel)
    for state, w in zip(trained, weights):
        total.add_(state, alpha=float(w))
    old = (total - sum(weights) * start) / sum(weights)
    error = float((old.double() - reference).abs().max())
    assert error > max(1e-7, 0.01 * float(reference.abs().max())), error
