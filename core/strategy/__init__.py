"""Aggregation strategies, one module each: client weights, what a client adds to its local run,
and how the summed deltas become a pseudo-gradient for the server optimizer.

Adding a strategy is a new module here with its class (options, check, named state, hooks) and
one line in :data:`STRATEGIES`; no engine file changes.
"""
from __future__ import annotations

from core.errors import UserError
from core.local_run import RunInputs
from core.strategy.dga import DGA
from core.strategy.fedavg import FedAvg
from core.strategy.feddyn import FedDyn
from core.strategy.fedprox import FedProx
from core.strategy.scaffold import Scaffold

STRATEGIES = {cls.name: cls for cls in (FedAvg, FedProx, Scaffold, DGA, FedDyn)}

__all__ = ["DGA", "FedAvg", "FedDyn", "FedProx", "RunInputs", "Scaffold", "STRATEGIES", "build_strategy"]


def build_strategy(name: str, strategy_config):
    """The strategy registered under ``name`` (config key ``strategy``).

    Raises:
        UserError: no strategy has that name.
    """
    if name not in STRATEGIES:
        raise UserError(f"strategy: unknown {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](strategy_config)
