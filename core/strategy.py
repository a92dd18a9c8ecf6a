"""Aggregation strategies: client weights, what a client adds to its loss, and how the summed
deltas become a pseudo-gradient for the server optimizer."""
from __future__ import annotations

import torch

from core.errors import UserError


class FedAvg:
    """Federated Averaging (McMahan et al. 2017, arXiv:1602.05629).

    Each client's delta (local model minus global model) is weighted by its number of train
    samples (``client_weighting: samples``) or equally (``uniform``); the pseudo-gradient is minus
    the weighted mean delta. Stepped by a server SGD with lr 1.0 this is exactly FedAvg; server SGD
    with momentum is FedAvgM (Hsu et al. 2019, arXiv:1909.06335); Adam / Yogi / Adagrad give
    FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, arXiv:2003.00295).
    """

    name = "fedavg"
    has_local_penalty = False

    def __init__(self, strategy_config):
        self.weighting = strategy_config.client_weighting

    def client_weight(self, num_samples: int) -> float:
        """Weight of a client with ``num_samples`` train samples in the aggregate."""
        return float(num_samples) if self.weighting == "samples" else 1.0

    def pseudo_gradient(self, delta_sum: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
        """(N,) pseudo-gradient from the (N,) weighted delta sum and the scalar weight sum."""
        return -delta_sum / weight_sum

    def local_penalty(self, params: list[torch.Tensor], anchors: list[torch.Tensor]):
        """A term added to every local training step's loss (None: nothing added)."""
        return None


class FedProx(FedAvg):
    """FedProx (Li et al. 2020, arXiv:1812.06127): each local step minimises
    ``loss + mu/2 * ||w - w_global||^2`` (``strategy_config.mu``), added once per step."""

    name = "fedprox"
    has_local_penalty = True

    def __init__(self, strategy_config):
        super().__init__(strategy_config)
        self.mu = strategy_config.mu

    def local_penalty(self, params, anchors):
        """``mu/2 * sum ||p - a||^2`` over the parameters and their global values (0-dim tensor)."""
        return 0.5 * self.mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchors))


STRATEGIES = {cls.name: cls for cls in (FedAvg, FedProx)}


def build_strategy(name: str, strategy_config):
    """The strategy registered under ``name`` (config key ``strategy``)."""
    if name not in STRATEGIES:
        raise UserError(f"strategy: unknown {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](strategy_config)
