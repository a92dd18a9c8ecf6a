"""FedProx: a proximal term to the global model in every local step."""
from __future__ import annotations

from pydantic import Field

from core.local_run import LocalRun, RunInputs, proximal
from core.strategy.fedavg import FedAvg


class FedProx(FedAvg):
    """FedProx (Li et al. 2020, arXiv:1812.06127): each local step minimises
    ``loss + mu/2 * ||w - w_global||^2`` (``strategy_config.mu``), added once per step.

    ``w`` is the shared parameters only: with personal layers (FedPer, FedRep, LG-FedAvg, FedBN)
    the global copy of a personal layer is never trained, so pulling toward it would pull the
    client's own layer back to its initial values. The term shapes the client's training run only,
    not the fine-tuning runs of evaluation (finetune, new clients).
    """

    name = "fedprox"
    summary = "FedAvg with a proximal term (mu)"

    class Options(FedAvg.Options):
        mu: float = Field(0.01, ge=0, description="FedProx proximal coefficient")

    def __init__(self, strategy_config):
        super().__init__(strategy_config)
        self.mu = strategy_config.mu

    def shape_run(self, run: LocalRun, inputs: RunInputs) -> LocalRun:
        if not inputs.shared:
            return run
        anchors = inputs.anchors()
        return run.but(penalty=proximal(self.mu, [anchors[i] for i in inputs.shared], inputs.shared))
