"""Aggregation strategies: client weights and how the summed deltas become a pseudo-gradient."""
from __future__ import annotations

import torch

from core.errors import UserError


class FedAvg:
    """Federated Averaging (McMahan et al. 2017, arXiv:1602.05629).

    Each client's delta (local model minus global model) is weighted by its number of train
    samples; the pseudo-gradient is minus the weighted mean delta. Stepped by a server SGD with
    lr 1.0 this is exactly FedAvg; other server optimizers give FedAvgM / FedAdam-style updates.
    """

    name = "fedavg"

    def client_weight(self, num_samples: int) -> float:
        """Weight of a client with ``num_samples`` train samples in the aggregate."""
        return float(num_samples)

    def pseudo_gradient(self, delta_sum: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
        """(N,) pseudo-gradient from the (N,) weighted delta sum and the scalar weight sum."""
        return -delta_sum / weight_sum


STRATEGIES = {cls.name: cls for cls in (FedAvg,)}


def build_strategy(name: str):
    """The strategy registered under ``name`` (config key ``strategy``)."""
    if name not in STRATEGIES:
        raise UserError(f"strategy: unknown {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()
